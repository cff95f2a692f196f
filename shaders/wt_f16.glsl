// f16 weights: rows of COLS IEEE halves, two per word, 4 uvec4 per block.
#ifndef WEIGHT_UP
#define WPARTS 1
struct WBlock { uvec4 q[4]; };

vec4 wvec(WBlock b, uint k) {
    uvec4 q = b.q[k >> 1];
    return (k & 1u) == 0u ? vec4(unpackHalf2x16(q.x), unpackHalf2x16(q.y))
                          : vec4(unpackHalf2x16(q.z), unpackHalf2x16(q.w));
}
float wscale(WBlock b) { return 1.0; }
#define HAS_WPART
#endif
layout(std430, binding = WBIND) readonly buffer WN(W) { uvec4 WN(w16)[]; };

WBlock WN(load_block)(uint r, uint j) {
    WBlock b;
    uint o = 4u * (r * NB + j);
    for (uint k = 0u; k < 4u; k++) b.q[k] = WN(w16)[o + k];
    return b;
}

vec4 WN(wpart)(uint r, uint j, uint k, out float d, out float m) {
    uint o = 4u * (r * NB + j) + (k >> 1), c = 2u * (k & 1u);
    d = 1.0;
    m = 0.0;
    return vec4(unpackHalf2x16(WN(w16)[o][c]), unpackHalf2x16(WN(w16)[o][c + 1u]));
}
