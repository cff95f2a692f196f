// Q4_K super-blocks (144 bytes: fp16 d and dmin, 12 bytes of 6-bit scales and minimums, 128 nibble bytes),
// uploaded as they are: 9 uvec4 each, the first holding d, dmin and the scales. Block i (32 values) of the 8
// in a super-block reads the 32 bytes of chunk i / 2, the low nibbles for even i, the high ones for odd i:
// byte l holds value l; value = d * sc_i * q - dmin * mn_i.
#ifndef WEIGHT_UP
#define HAS_MIN
#define WPARTS 1
#include "kquant.glsl"
struct WBlock { uvec4 q0; uvec4 q1; uint shift; float d; float m; };

// The four values of a code word already shifted to its nibbles.
vec4 q4k_vals(uint w) { return vec4(uvec4(w, w >> 8, w >> 16, w >> 24) & 0xFu); }

vec4 wvec(WBlock b, uint k) { return q4k_vals((k < 4u ? b.q0[k] : b.q1[k - 4u]) >> b.shift); }
float wscale(WBlock b) { return b.d; }
float wmin(WBlock b) { return b.m; }
#define HAS_WPART
#endif
layout(std430, binding = WBIND) readonly buffer WN(W) { uvec4 WN(wk)[]; };

WBlock WN(load_block)(uint r, uint j) {
    uint o = 9u * (r * NS + (j >> 3)), i = j & 7u, c = i >> 1;
    uvec4 head = WN(wk)[o];
    vec2 dm = scale_min_values(head.x, head.y, head.z, head.w, i);
    return WBlock(WN(wk)[o + 1u + 2u * c], WN(wk)[o + 2u + 2u * c], 4u * (i & 1u), dm.x, dm.y);
}

// A mat-vec lane's quarter k of block j: its one code word (word k of chunk i / 2; the 8 lanes of a block
// read 32 neighbouring bytes) and the head's d/dmin word and scale words, not the whole block.
vec4 WN(wpart)(uint r, uint j, uint k, out float d, out float m) {
    uint o = 9u * (r * NS + (j >> 3)), i = j & 7u;
    vec2 dm = scale_min_values(WN(wk)[o].x, WN(wk)[o].y, WN(wk)[o].z, i >= 4u ? WN(wk)[o].w : 0u, i);
    d = dm.x;
    m = dm.y;
    return q4k_vals(WN(wk)[o + 1u + 2u * (i >> 1) + (k >> 2)][k & 3u] >> (4u * (i & 1u)));
}
