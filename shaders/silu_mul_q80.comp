#version 450
// silu_mul.comp's gate = silu(gate) * up and the Q80 blocks of the result (quantize_q80.comp's arithmetic),
// one invocation per pair of consecutive blocks of the flat buffers (as quantize_q80.comp pairs them): the FFN's
// gating before a down projection with Q80 inputs in one dispatch. A pair's second block past the live rows
// keeps its bytes. KEEP_F32: the gated f32 values go back into gate too (a later op reads them).
#extension GL_GOOGLE_include_directive : require
#include "common.glsl"
layout(constant_id = 1) const uint W = 32;  // values per row, a multiple of 32

#ifdef KEEP_F32
layout(std430, binding = 0) buffer G { float gate[]; };
#else
layout(std430, binding = 0) readonly buffer G { float gate[]; };
#endif
layout(std430, binding = 1) readonly buffer U { float up[]; };
layout(std430, binding = 2) buffer Q { uint q[]; };
#include "q80_pair.glsl"

void main() {
    uint p = global_index(), blocks = pc.n * (W / 32u);
    if (2u * p >= blocks) return;
    bool both = 2u * p + 1u < blocks;
    for (uint i = 0u; i < 64u; i++) {
        uint g = 64u * p + i;
        vals[i] = 0.0;
        if (i < 32u || both) {
            vals[i] = swiglu(gate[g], up[g]);
#ifdef KEEP_F32
            gate[g] = vals[i];
#endif
        }
    }
    q80_quantize();
    for (uint w = 0u; w < (both ? 17u : 8u); w++) q[17u * p + w] = q80_word(w);
    if (!both) q[17u * p + 8u] = (q80_word(8u) & 0xFFFFu) | (q[17u * p + 8u] & 0xFFFF0000u);
}
