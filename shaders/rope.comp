#version 450
// Rotary embedding in place on rows of WIDTH = heads * HD values, row b by position pos[b]. Pair i of a head is
// (2i, 2i+1) (interleaved, Llama) or (i, i + HD/2) (NEOX = 1); its angle's cos/sin come from a table of
// max_seq x HD/2 (cos, sin) pairs computed on the host (Llama 3.1 scaling and rope_freqs included there).
#extension GL_GOOGLE_include_directive : require
#include "common.glsl"
layout(constant_id = 1) const uint WIDTH = 2;
layout(constant_id = 2) const uint HD = 2;
layout(constant_id = 3) const uint NEOX = 0;
const uint HALF = HD / 2u;

layout(std430, binding = 0) buffer X { float x[]; };
layout(std430, binding = 1) readonly buffer P { int pos[]; };
layout(std430, binding = 2) readonly buffer T { vec2 cs[]; };

void main() {
    uint g = global_index();
    uint pairs = WIDTH / 2u;
    if (g >= pc.n * pairs) return;
    uint b = g / pairs, p = g % pairs;
    uint h = p / HALF, i = p % HALF;
    uint e0 = b * WIDTH + h * HD + (NEOX != 0u ? i : 2u * i);
    uint e1 = e0 + (NEOX != 0u ? HALF : 1u);
    vec2 c = cs[uint(pos[b]) * HALF + i];
    float x0 = x[e0], x1 = x[e1];
    x[e0] = x0 * c.x - x1 * c.y;
    x[e1] = x0 * c.y + x1 * c.x;
}
