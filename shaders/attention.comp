#version 450
// Causal GQA attention: one workgroup per (batch row b, query head h). Query head h reads KV head
// (QOFF + h) / GROUP (GROUP: the model's query heads per KV head; QOFF: where this node's first query head
// sits in its first KV group); scores over cache rows 0..pos[b] are scaled by 1/sqrt(HD), soft-maxed (max-subtracted)
// in a global scratch row, and the output is the score-weighted sum of the value rows. The cache buffers
// hold several layers of SEQ rows: pc.aux selects the layer. KV_F16: an f16 cache, two halves per word.
#extension GL_GOOGLE_include_directive : require
#include "common.glsl"
#include "reduce.glsl"
layout(constant_id = 1) const uint NH = 1;
layout(constant_id = 2) const uint NKV = 1;
layout(constant_id = 3) const uint HD = 1;       // at most 256
layout(constant_id = 4) const uint SEQ = 1;      // cache rows (max sequence length)
layout(constant_id = 5) const uint GROUP = 1;
layout(constant_id = 6) const uint QOFF = 0;
const uint KVW = NKV * HD;

layout(std430, binding = 0) readonly buffer Q { float q[]; };
layout(std430, binding = 1) readonly buffer P { int pos[]; };
#ifdef KV_F16
layout(std430, binding = 2) readonly buffer KC { uint kc[]; };
layout(std430, binding = 3) readonly buffer VC { uint vc[]; };
#define K_AT(i) unpackHalf2x16(kc[(i) >> 1])[(i) & 1u]
#define V_AT(i) unpackHalf2x16(vc[(i) >> 1])[(i) & 1u]
#else
layout(std430, binding = 2) readonly buffer KC { float kc[]; };
layout(std430, binding = 3) readonly buffer VC { float vc[]; };
#define K_AT(i) kc[i]
#define V_AT(i) vc[i]
#endif
layout(std430, binding = 4) writeonly buffer O { float o[]; };
layout(std430, binding = 5) buffer S { float sc[]; };

shared float qh[256];

void main() {
    uint wg = wg_index();
    uint b = wg / NH, h = wg % NH;
    if (b >= pc.n) return;
    uint t = gl_LocalInvocationID.x;
    uint kvo = pc.aux * SEQ * KVW + ((QOFF + h) / GROUP) * HD;
    uint qo = (b * NH + h) * HD;
    uint so = (b * NH + h) * SEQ;
    uint last = uint(pos[b]);
    for (uint d = t; d < HD; d += gl_WorkGroupSize.x) qh[d] = q[qo + d];
    barrier();
    float scale = 1.0 / sqrt(float(HD));
    float mx = -3.402823e38;
    for (uint s = t; s <= last; s += gl_WorkGroupSize.x) {
        float acc = 0.0;
        for (uint d = 0u; d < HD; d++) acc += qh[d] * K_AT(s * KVW + kvo + d);
        acc *= scale;
        sc[so + s] = acc;
        mx = max(mx, acc);
    }
    mx = wg_max(mx);
    float sum = 0.0;
    for (uint s = t; s <= last; s += gl_WorkGroupSize.x) {
        float e = exp(sc[so + s] - mx);
        sc[so + s] = e;
        sum += e;
    }
    sum = wg_sum(sum);
    memoryBarrierBuffer();
    barrier();
    float inv = 1.0 / sum;
    for (uint d = t; d < HD; d += gl_WorkGroupSize.x) {
        float acc = 0.0;
        for (uint s = 0u; s <= last; s++) acc += sc[so + s] * V_AT(s * KVW + kvo + d);
        o[qo + d] = acc * inv;
    }
}
