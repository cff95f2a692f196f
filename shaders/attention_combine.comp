#version 450
// Causal GQA attention, pass 2 of 2: one workgroup per (batch row b, query head h) merges the chunk records
// attention.comp wrote for the chunks that hold positions 0..pos[b] (each: its max score m_c, sum of
// exp(score - m_c) l_c, exp-weighted value sum a_c): out = sum_c a_c e^(m_c - M) / sum_c l_c e^(m_c - M),
// M the largest m_c.
#extension GL_GOOGLE_include_directive : require
#include "common.glsl"
layout(constant_id = 1) const uint NH = 1;
layout(constant_id = 2) const uint HD = 1;
layout(constant_id = 3) const uint CH = 1;       // positions per chunk
layout(constant_id = 4) const uint NCH = 1;      // chunk records per (row, head)
const uint REC = HD + 2u;

layout(std430, binding = 0) readonly buffer PART { float part[]; };
layout(std430, binding = 1) readonly buffer P { int pos[]; };
layout(std430, binding = 2) writeonly buffer O { float o[]; };

void main() {
    uint wg = wg_index();
    uint b = wg / NH, h = wg % NH;
    if (b >= pc.n) return;
    uint t = gl_LocalInvocationID.x;
    uint nc = uint(pos[b]) / CH + 1u, base = (b * NH + h) * NCH * REC;
    float m = -3.402823e38;
    for (uint c = 0u; c < nc; c++) m = max(m, part[base + c * REC]);
    float l = 0.0;
    for (uint c = 0u; c < nc; c++) l += part[base + c * REC + 1u] * exp(part[base + c * REC] - m);
    float inv = 1.0 / l;
    for (uint d = t; d < HD; d += gl_WorkGroupSize.x) {
        float a = 0.0;
        for (uint c = 0u; c < nc; c++) a += part[base + c * REC + 2u + d] * exp(part[base + c * REC] - m);
        o[(b * NH + h) * HD + d] = a * inv;
    }
}
