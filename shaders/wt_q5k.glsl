// Q5_K super-blocks (176 bytes: fp16 d and dmin, 12 bytes of 6-bit scales and minimums, 32 bytes of fifth
// bits, 128 nibble bytes), uploaded as they are: 11 uvec4 each (head, 2 of high bits, 8 of nibbles). Block i
// (32 values) of the 8 reads chunk i / 2 of the nibbles as Q4_K does, and bit i of high byte l is the fifth
// bit of its value l; value = d * sc_i * q - dmin * mn_i.
#ifndef WEIGHT_UP
#define HAS_MIN
#define WPARTS 1
#include "kquant.glsl"
struct WBlock { uvec4 q0; uvec4 q1; uvec4 h0; uvec4 h1; uint shift; uint bit; float d; float m; };

// The four values of a code word and a high-bit word already shifted to their nibbles and fifth bits.
vec4 q5k_vals(uint w, uint h) {
    return vec4((uvec4(w, w >> 8, w >> 16, w >> 24) & 0xFu) | ((uvec4(h, h >> 8, h >> 16, h >> 24) & 1u) << 4));
}

vec4 wvec(WBlock b, uint k) {
    uint w = (k < 4u ? b.q0[k] : b.q1[k - 4u]) >> b.shift;
    return q5k_vals(w, (k < 4u ? b.h0[k] : b.h1[k - 4u]) >> b.bit);
}
float wscale(WBlock b) { return b.d; }
float wmin(WBlock b) { return b.m; }
#define HAS_WPART
#endif
layout(std430, binding = WBIND) readonly buffer WN(W) { uvec4 WN(wk)[]; };

WBlock WN(load_block)(uint r, uint j) {
    uint o = 11u * (r * NS + (j >> 3)), i = j & 7u, c = i >> 1;
    uvec4 head = WN(wk)[o];
    vec2 dm = scale_min_values(head.x, head.y, head.z, head.w, i);
    return WBlock(WN(wk)[o + 3u + 2u * c], WN(wk)[o + 4u + 2u * c], WN(wk)[o + 1u], WN(wk)[o + 2u], 4u * (i & 1u),
                  i, dm.x, dm.y);
}

// A mat-vec lane's quarter k of block j: one code word, the high-bit word k (shared by the 8 blocks of the
// super-block) and the head's d/dmin word and scale words, not the whole block.
vec4 WN(wpart)(uint r, uint j, uint k, out float d, out float m) {
    uint o = 11u * (r * NS + (j >> 3)), i = j & 7u;
    vec2 dm = scale_min_values(WN(wk)[o].x, WN(wk)[o].y, WN(wk)[o].z, i >= 4u ? WN(wk)[o].w : 0u, i);
    d = dm.x;
    m = dm.y;
    uint w = WN(wk)[o + 3u + 2u * (i >> 1) + (k >> 2)][k & 3u] >> (4u * (i & 1u));
    return q5k_vals(w, WN(wk)[o + 1u + (k >> 2)][k & 3u] >> i);
}
