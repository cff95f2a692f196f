#version 450
// SwiGLU: gate = silu(gate) * up = gate / (1 + exp(-gate)) * up, in place.
#extension GL_GOOGLE_include_directive : require
#include "common.glsl"
layout(constant_id = 1) const uint W = 1;

layout(std430, binding = 0) buffer G { float gate[]; };
layout(std430, binding = 1) readonly buffer U { float up[]; };

void main() {
    uint g = global_index();
    if (g >= pc.n * W) return;
    gate[g] = swiglu(gate[g], up[g]);
}
