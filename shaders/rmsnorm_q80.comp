#version 450
// rmsnorm of whole rows (rmsnorm.comp's arithmetic and reduction, GROUP = DIM) and the Q80 blocks of the result
// (quantize_q80.comp's), one workgroup per batch row: the norm before a matmul with Q80 inputs in one dispatch.
// KEEP_F32: the normalised f32 row is written too (a later op reads it). The weight buffer may hold several
// layers' vectors: pc.aux selects one.
#extension GL_GOOGLE_include_directive : require
#include "common.glsl"
#include "reduce.glsl"
layout(constant_id = 1) const uint DIM = 64;       // a multiple of 64: a row is whole pairs of blocks
layout(constant_id = 2) const uint EPS_BITS = 0;   // float eps as its bit pattern

layout(std430, binding = 0) readonly buffer X { float x[]; };
layout(std430, binding = 1) writeonly buffer Q { uint q[]; };
layout(std430, binding = 2) readonly buffer W { float w[]; };
#ifdef KEEP_F32
layout(std430, binding = 3) writeonly buffer O { float o[]; };
#endif
#include "q80_pair.glsl"

void main() {
    uint b = wg_index();
    if (b >= pc.n) return;
    uint t = gl_LocalInvocationID.x, base = b * DIM;
    float ss = 0.0;
    for (uint i = t; i < DIM; i += gl_WorkGroupSize.x) ss += x[base + i] * x[base + i];
    ss = wg_sum(ss);
    float scale = 1.0 / sqrt(ss / float(DIM) + uintBitsToFloat(EPS_BITS));
    for (uint p = t; p < DIM / 64u; p += gl_WorkGroupSize.x) {
        for (uint i = 0u; i < 64u; i++) {
            uint j = 64u * p + i;
            vals[i] = w[pc.aux * DIM + j] * (x[base + j] * scale);
#ifdef KEEP_F32
            o[base + j] = vals[i];
#endif
        }
        q80_quantize();
        for (uint wd = 0u; wd < 17u; wd++) q[17u * (b * (DIM / 64u) + p) + wd] = q80_word(wd);
    }
}
