// Shape of a weight matrix (pc.rows x COLS, COLS a multiple of 32) as read by the matmul and embedding
// shaders, which work a 32-value block at a time: wvec(blk, k) are the weights of block positions 4k..4k+3.
// A K-quant super-block of 256 values is 8 such blocks, each with its own scale (and minimum).
// A buffer may hold the matrices of several layers back to back; pc.aux selects one (row pc.aux * rows + r).
// The weight's buffers are bound from WBIND on: 2, or 3 for expert stacks (MOE: binding 2 is the routing).
layout(constant_id = 1) const uint COLS = 32;
const uint NB = COLS / 32u;          // blocks per row
const uint NBH = (NB + 1u) / 2u;     // words per row of fp16 block scales (two per word, rows padded)
const uint NS = COLS / 256u;         // K-quant super-blocks per row
const uint NSH = (NS + 1u) / 2u;     // words per row of fp16 super-block scales (two per word, rows padded)
#ifdef MOE
#define WBIND 3
#else
#define WBIND 2
#endif
// The weight's buffer and loader names in wt_<type>.glsl (weights_up.glsl renames a second weight's).
#define WN(name) name
