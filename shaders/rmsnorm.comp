#version 450
// out[b] = w * x[b] / sqrt(mean(x[b]^2) + eps); one workgroup per batch row. The weight buffer may hold
// several layers' vectors: pc.aux selects one.
#extension GL_GOOGLE_include_directive : require
#include "common.glsl"
#include "reduce.glsl"
layout(constant_id = 1) const uint DIM = 1;
layout(constant_id = 2) const uint EPS_BITS = 0;   // float eps as its bit pattern

layout(std430, binding = 0) readonly buffer X { float x[]; };
layout(std430, binding = 1) writeonly buffer O { float o[]; };
layout(std430, binding = 2) readonly buffer W { float w[]; };

void main() {
    uint b = wg_index();
    if (b >= pc.n) return;
    uint t = gl_LocalInvocationID.x, base = b * DIM;
    float ss = 0.0;
    for (uint i = t; i < DIM; i += gl_WorkGroupSize.x) ss += x[base + i] * x[base + i];
    ss = wg_sum(ss);
    float scale = 1.0 / sqrt(ss / float(DIM) + uintBitsToFloat(EPS_BITS));
    for (uint i = t; i < DIM; i += gl_WorkGroupSize.x) {
        o[base + i] = w[pc.aux * DIM + i] * (x[base + i] * scale);
    }
}
