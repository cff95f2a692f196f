#version 450
// Copy n words from binding 0 to word offset aux of binding 1: weight uploads from the staging buffer into
// device-only buffers (Kompute cannot make those transfer destinations), and test read-backs.
#extension GL_GOOGLE_include_directive : require
#include "common.glsl"

layout(std430, binding = 0) readonly buffer S { uint src[]; };
layout(std430, binding = 1) writeonly buffer D { uint dst[]; };

void main() {
    uint i = global_index();
    if (i < pc.n) dst[pc.aux + i] = src[i];
}
