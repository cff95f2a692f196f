#version 450
// Residual add: x[b] += every slot of zq row b, slot 0 first (the same order on every node).
#extension GL_GOOGLE_include_directive : require
#include "common.glsl"
layout(constant_id = 1) const uint DIM = 1;
layout(constant_id = 2) const uint SLOTS = 1;

layout(std430, binding = 0) readonly buffer Z { float z[]; };
layout(std430, binding = 1) buffer X { float x[]; };

void main() {
    uint g = global_index();
    if (g >= pc.n * DIM) return;
    uint b = g / DIM, i = g % DIM;
    float v = x[g];
    for (uint s = 0u; s < SLOTS; s++) v += z[(b * SLOTS + s) * DIM + i];
    x[g] = v;
}
