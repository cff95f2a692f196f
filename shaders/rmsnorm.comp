#version 450
// out = w * x / sqrt(mean(x^2) + eps) over every group of GROUP consecutive values of a row (GROUP = DIM: the
// whole row; GROUP = head_dim: Qwen3's per-head q/k norm); one workgroup per (batch row, group). In place
// when x and out are the same buffer: every value is read and written by the same invocation. The weight
// buffer may hold several layers' vectors of GROUP values: pc.aux selects one.
#extension GL_GOOGLE_include_directive : require
#include "common.glsl"
#include "reduce.glsl"
layout(constant_id = 1) const uint DIM = 1;
layout(constant_id = 2) const uint EPS_BITS = 0;   // float eps as its bit pattern
layout(constant_id = 3) const uint GROUP = 1;      // divides DIM

layout(std430, binding = 0) readonly buffer X { float x[]; };
layout(std430, binding = 1) writeonly buffer O { float o[]; };
layout(std430, binding = 2) readonly buffer W { float w[]; };

void main() {
    uint g = wg_index(), groups = DIM / GROUP;
    if (g >= pc.n * groups) return;
    uint t = gl_LocalInvocationID.x, base = (g / groups) * DIM + (g % groups) * GROUP;
    float ss = 0.0;
    for (uint i = t; i < GROUP; i += gl_WorkGroupSize.x) ss += x[base + i] * x[base + i];
    ss = wg_sum(ss);
    float scale = 1.0 / sqrt(ss / float(GROUP) + uintBitsToFloat(EPS_BITS));
    for (uint i = t; i < GROUP; i += gl_WorkGroupSize.x) {
        o[base + i] = w[pc.aux * GROUP + i] * (x[base + i] * scale);
    }
}
