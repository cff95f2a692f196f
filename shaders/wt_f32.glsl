// f32 weights: rows of COLS floats, 8 vec4 per block.
#ifndef WEIGHT_UP
#define WPARTS 1
struct WBlock { vec4 v[8]; };

vec4 wvec(WBlock b, uint k) { return b.v[k]; }
float wscale(WBlock b) { return 1.0; }
#define HAS_WPART
#endif
layout(std430, binding = WBIND) readonly buffer WN(W) { vec4 WN(w4)[]; };

WBlock WN(load_block)(uint r, uint j) {
    WBlock b;
    uint o = 8u * (r * NB + j);
    for (uint k = 0u; k < 8u; k++) b.v[k] = WN(w4)[o + k];
    return b;
}

vec4 WN(wpart)(uint r, uint j, uint k, out float d, out float m) {
    d = 1.0;
    m = 0.0;
    return WN(w4)[8u * (r * NB + j) + k];
}
