// Q8_0 blocks, re-packed at upload into two aligned arrays of the same total size: the 32 int8 values of
// every block (two uvec4) and the fp16 scales (two per word, each row padded to a word). value = d * q.
#ifndef WEIGHT_UP
#define WPARTS 2
struct WBlock { uvec4 q0; uvec4 q1; float d; };

vec4 wvec(WBlock b, uint k) { return i8x4(k < 4u ? b.q0[k] : b.q1[k - 4u]); }
float wscale(WBlock b) { return b.d; }
// INT_DOT: the signed codes of values 4k..4k+3, a byte each; value = d * code.
uint wcodes(WBlock b, uint k) { return k < 4u ? b.q0[k] : b.q1[k - 4u]; }
#endif
layout(std430, binding = WBIND) readonly buffer WN(WQ) { uvec4 WN(wq)[]; };
layout(std430, binding = WBIND + 1) readonly buffer WN(WD) { uint WN(wd)[]; };

WBlock WN(load_block)(uint r, uint j) {
    uint i = r * NB + j;
    return WBlock(WN(wq)[2u * i], WN(wq)[2u * i + 1u], half_at(WN(wd)[r * NBH + (j >> 1)], j & 1u));
}
