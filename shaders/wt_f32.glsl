// f32 weights: rows of COLS floats, 8 vec4 per block.
layout(std430, binding = WBIND) readonly buffer W { vec4 w4[]; };

struct WBlock { vec4 v[8]; };

WBlock load_block(uint r, uint j) {
    WBlock b;
    uint o = 8u * (r * NB + j);
    for (uint k = 0u; k < 8u; k++) b.v[k] = w4[o + k];
    return b;
}

vec4 wvec(WBlock b, uint k) { return b.v[k]; }
float wscale(WBlock b) { return 1.0; }

#define HAS_WPART
vec4 wpart(uint r, uint j, uint k, out float d, out float m) {
    d = 1.0;
    m = 0.0;
    return w4[8u * (r * NB + j) + k];
}
