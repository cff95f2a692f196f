#version 450
// Residual add from Q80 slots: x[b] += dequantize(slot s of zq row b) for s = 0, 1, ... in order.
// This is also the Q80 de-quantisation shader: value = int8 q * fp16 d.
#extension GL_GOOGLE_include_directive : require
#include "common.glsl"
layout(constant_id = 1) const uint DIM = 32;
layout(constant_id = 2) const uint SLOTS = 1;
const uint NB = DIM / 32u;

layout(std430, binding = 0) readonly buffer Z { uint zq[]; };
layout(std430, binding = 1) buffer X { float x[]; };

void main() {
    uint g = global_index();
    if (g >= pc.n * DIM) return;
    uint b = g / DIM, i = g % DIM;
    float v = x[g];
    for (uint s = 0u; s < SLOTS; s++) {
        uint off = ((b * SLOTS + s) * NB + i / 32u) * 34u;
        float d = half_at(zq[off >> 2], off & 2u);
        uint o = off + 2u + (i & 31u);
        v += float(int(LOAD_U8(zq, o) << 24) >> 24) * d;
    }
    x[g] = v;
}
