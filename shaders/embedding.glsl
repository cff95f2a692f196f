// x[b] = W[tok[b]] de-quantized to f32, one invocation per 32-value block. Included after common.glsl,
// weights_head.glsl and one wt_<type>.glsl. Token ids are range-checked on the host before the dispatch.
// The table may be one row range (piece) of a table too large for one buffer, rows ROW0 .. ROW0 + pc.rows:
// a dispatch per piece writes the tokens that fall in it.
layout(constant_id = 2) const uint ROW0 = 0;

layout(std430, binding = 0) readonly buffer T { int tok[]; };
layout(std430, binding = 1) writeonly buffer Y { vec4 y4[]; };

void main() {
    uint g = global_index();
    uint b = g / NB, j = g % NB;
    if (b >= pc.n) return;
    int t = tok[b] - int(ROW0);
    if (t < 0 || t >= int(pc.rows)) return;
    WBlock w = load_block(pc.aux * pc.rows + uint(t), j);
    float d = wscale(w);
#ifdef HAS_MIN
    float m = wmin(w);
#else
    float m = 0.0;
#endif
    for (uint k = 0u; k < 8u; k++) y4[8u * (b * NB + j) + k] = d * wvec(w, k) + m;
}
