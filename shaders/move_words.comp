#version 450
// Copy n words within one buffer, from word offset aux to word offset rows (the ranges do not overlap): the
// last row of a device-local pipe moved to row 0 before the classifier runs on that row alone.
#extension GL_GOOGLE_include_directive : require
#include "common.glsl"

layout(std430, binding = 0) buffer D { uint d[]; };

void main() {
    uint i = global_index();
    if (i < pc.n) d[pc.rows + i] = d[pc.aux + i];
}
