#version 450
// Append this batch's keys and values to the layer's cache: row b goes to cache row pos[b]. The cache buffers
// hold several layers of SEQ rows: pc.aux selects the layer.
#extension GL_GOOGLE_include_directive : require
#include "common.glsl"
layout(constant_id = 1) const uint KVW = 1;
layout(constant_id = 2) const uint SEQ = 1;

layout(std430, binding = 0) readonly buffer K { float k[]; };
layout(std430, binding = 1) readonly buffer V { float v[]; };
layout(std430, binding = 2) readonly buffer P { int pos[]; };
layout(std430, binding = 3) writeonly buffer KC { float kc[]; };
layout(std430, binding = 4) writeonly buffer VC { float vc[]; };

void main() {
    uint g = global_index();
    if (g >= pc.n * KVW) return;
    uint b = g / KVW, i = g % KVW;
    uint o = (pc.aux * SEQ + uint(pos[b])) * KVW + i;
    kc[o] = k[g];
    vc[o] = v[g];
}
