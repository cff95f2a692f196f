// Q4_K super-blocks (144 bytes: fp16 d and dmin, 12 bytes of 6-bit scales and minimums, 128 nibble bytes),
// uploaded as they are: 9 uvec4 each, the first holding d, dmin and the scales. Block i (32 values) of the 8
// in a super-block reads the 32 bytes of chunk i / 2, the low nibbles for even i, the high ones for odd i:
// byte l holds value l; value = d * sc_i * q - dmin * mn_i.
#define HAS_MIN
#include "kquant.glsl"
layout(std430, binding = WBIND) readonly buffer W { uvec4 wk[]; };

struct WBlock { uvec4 q0; uvec4 q1; uint shift; float d; float m; };

WBlock load_block(uint r, uint j) {
    uint o = 9u * (r * NS + (j >> 3)), i = j & 7u, c = i >> 1;
    uvec4 head = wk[o];
    vec2 dm = scale_min_values(head.x, head.y, head.z, head.w, i);
    return WBlock(wk[o + 1u + 2u * c], wk[o + 2u + 2u * c], 4u * (i & 1u), dm.x, dm.y);
}

// The four values of a code word already shifted to its nibbles.
vec4 q4k_vals(uint w) { return vec4(uvec4(w, w >> 8, w >> 16, w >> 24) & 0xFu); }

vec4 wvec(WBlock b, uint k) { return q4k_vals((k < 4u ? b.q0[k] : b.q1[k - 4u]) >> b.shift); }
float wscale(WBlock b) { return b.d; }
float wmin(WBlock b) { return b.m; }

// A mat-vec lane's quarter k of block j: its one code word (word k of chunk i / 2; the 8 lanes of a block
// read 32 neighbouring bytes) and the head's d/dmin word and scale words, not the whole block.
#define HAS_WPART
vec4 wpart(uint r, uint j, uint k, out float d, out float m) {
    uint o = 9u * (r * NS + (j >> 3)), i = j & 7u;
    vec2 dm = scale_min_values(wk[o].x, wk[o].y, wk[o].z, i >= 4u ? wk[o].w : 0u, i);
    d = dm.x;
    m = dm.y;
    return q4k_vals(wk[o + 1u + 2u * (i >> 1) + (k >> 2)][k & 3u] >> (4u * (i & 1u)));
}
