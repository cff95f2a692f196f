// GATE_UP (matmul.glsl): a second weight of the first's type and shape, the FFN's up projection, is the
// type's wt_<type>.glsl included again after this: its buffers bound after the first weight's WPARTS, its
// buffer and loader names ending in _up (load_block_up, wpart_up), the decoding shared with the first.
#define WEIGHT_UP
#undef WBIND
#define WBIND (2 + WPARTS)
#undef WN
#define WN(name) name##_up
