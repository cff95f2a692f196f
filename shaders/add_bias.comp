#version 450
// x[b] += bias, in place (Qwen2's q/k/v biases). The bias buffer may hold several layers' vectors: pc.aux
// selects one.
#extension GL_GOOGLE_include_directive : require
#include "common.glsl"
layout(constant_id = 1) const uint W = 1;

layout(std430, binding = 0) buffer X { float x[]; };
layout(std430, binding = 1) readonly buffer B { float bias[]; };

void main() {
    uint g = global_index();
    if (g >= pc.n * W) return;
    x[g] += bias[pc.aux * W + g % W];
}
