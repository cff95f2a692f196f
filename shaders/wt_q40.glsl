// Q4_0 blocks, re-packed at upload into two aligned arrays of the same total size: the 16 nibble bytes of
// every block (one uvec4, block after block) and the fp16 scales (two per word, each row padded to a word).
// Byte j of a block holds value j (low nibble) and value j + 16 (high nibble); value = d * (nibble - 8).
#ifndef WEIGHT_UP
#define WPARTS 2
struct WBlock { uvec4 q; float d; };

vec4 wvec(WBlock b, uint k) {
    uint w = b.q[k & 3u] >> (4u * (k >> 2));
    return vec4(uvec4(w, w >> 8, w >> 16, w >> 24) & 0xFu) - 8.0;
}
float wscale(WBlock b) { return b.d; }
// INT_DOT: the codes of values 4k..4k+3, a byte each (0..15); value = d * (code - W_OFFSET).
#define W_OFFSET 8
uint wcodes(WBlock b, uint k) { return (b.q[k & 3u] >> (4u * (k >> 2))) & 0x0F0F0F0Fu; }
#endif
layout(std430, binding = WBIND) readonly buffer WN(WQ) { uvec4 WN(wq)[]; };
layout(std430, binding = WBIND + 1) readonly buffer WN(WD) { uint WN(wd)[]; };

WBlock WN(load_block)(uint r, uint j) {
    return WBlock(WN(wq)[r * NB + j], half_at(WN(wd)[r * NBH + (j >> 1)], j & 1u));
}
