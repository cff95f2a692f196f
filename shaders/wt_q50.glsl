// Q5_0 blocks (22 bytes), split at upload into three aligned arrays of the same total size: the 16 nibble
// bytes of every block (one uvec4), the fp16 scales (two per word, each row padded to a word) and the 32
// fifth bits (one word per block, bit i for value i). Byte j holds value j (low nibble) and value j + 16
// (high nibble); value = d * (q - 16).
#ifndef WEIGHT_UP
#define WPARTS 3
struct WBlock { uvec4 q; uint h; float d; };

vec4 wvec(WBlock b, uint k) {
    uint w = b.q[k & 3u] >> (4u * (k >> 2)), h = b.h >> (4u * k);
    uvec4 q = (uvec4(w, w >> 8, w >> 16, w >> 24) & 0xFu) | ((uvec4(h, h >> 1, h >> 2, h >> 3) & 1u) << 4);
    return vec4(q) - 16.0;
}
float wscale(WBlock b) { return b.d; }
// INT_DOT: the codes of values 4k..4k+3, a byte each (0..31: nibble | fifth bit << 4); value = d * (code -
// W_OFFSET).
#define W_OFFSET 16
uint wcodes(WBlock b, uint k) {
    uint h = b.h >> (4u * k);
    uint hi = ((h & 1u) << 4) | ((h & 2u) << 11) | ((h & 4u) << 18) | ((h & 8u) << 25);
    return ((b.q[k & 3u] >> (4u * (k >> 2))) & 0x0F0F0F0Fu) | hi;
}
#endif
layout(std430, binding = WBIND) readonly buffer WN(WQ) { uvec4 WN(wq)[]; };
layout(std430, binding = WBIND + 1) readonly buffer WN(WD) { uint WN(wd)[]; };
layout(std430, binding = WBIND + 2) readonly buffer WN(WH) { uint WN(wh)[]; };

WBlock WN(load_block)(uint r, uint j) {
    uint i = r * NB + j;
    return WBlock(WN(wq)[i], WN(wh)[i], half_at(WN(wd)[r * NBH + (j >> 1)], j & 1u));
}
