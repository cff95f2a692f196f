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
    vec2 dm = unpackHalf2x16(head.x);
    uvec2 sm = scale_min(head, i);
    return WBlock(wk[o + 1u + 2u * c], wk[o + 2u + 2u * c], 4u * (i & 1u), dm.x * float(sm.x),
                  -dm.y * float(sm.y));
}

vec4 wvec(WBlock b, uint k) {
    uint w = (k < 4u ? b.q0[k] : b.q1[k - 4u]) >> b.shift;
    return vec4(uvec4(w, w >> 8, w >> 16, w >> 24) & 0xFu);
}
float wscale(WBlock b) { return b.d; }
float wmin(WBlock b) { return b.m; }
