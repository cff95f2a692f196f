#version 450
// f32 y[b] -> slot SLOT of the zq pipe row b (each row holds SLOTS slots of DIM values).
#extension GL_GOOGLE_include_directive : require
#include "common.glsl"
layout(constant_id = 1) const uint DIM = 1;
layout(constant_id = 2) const uint SLOTS = 1;
layout(constant_id = 3) const uint SLOT = 0;

layout(std430, binding = 0) readonly buffer Y { float y[]; };
layout(std430, binding = 1) writeonly buffer Z { float z[]; };

void main() {
    uint g = global_index();
    if (g >= pc.n * DIM) return;
    uint b = g / DIM, i = g % DIM;
    z[(b * SLOTS + SLOT) * DIM + i] = y[g];
}
