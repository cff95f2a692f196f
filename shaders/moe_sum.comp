#version 450
// y[b] = sum over slots s (in slot order) of w[b, s] * ys[b, s * W .. (s + 1) * W): the routed experts'
// outputs weighted by the router.
#extension GL_GOOGLE_include_directive : require
#include "common.glsl"
layout(constant_id = 1) const uint W = 1;
layout(constant_id = 2) const uint K = 1;

layout(std430, binding = 0) readonly buffer S { float ys[]; };
layout(std430, binding = 1) readonly buffer P { float w[]; };
layout(std430, binding = 2) writeonly buffer Y { float y[]; };

void main() {
    uint g = global_index();
    if (g >= pc.n * W) return;
    uint b = g / W, i = g % W;
    float v = 0.0;
    for (uint s = 0u; s < K; s++) v += w[b * K + s] * ys[(b * K + s) * W + i];
    y[g] = v;
}
