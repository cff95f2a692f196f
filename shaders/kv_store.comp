#version 450
// Append this batch's keys and values to the layer's cache: row b goes to cache row pos[b] of its slot (NS > 1:
// slot[b] picks rows slot*SEQ..; NS 1: the slot binding is unused). The cache buffers hold several layers of
// NS * SEQ rows: pc.aux selects the layer. KV_F16: an f16 cache, two halves per word (one
// invocation per pair of values; KVW is even).
#extension GL_GOOGLE_include_directive : require
#include "common.glsl"
layout(constant_id = 1) const uint KVW = 1;
layout(constant_id = 2) const uint SEQ = 1;
layout(constant_id = 3) const uint NS = 1;

layout(std430, binding = 0) readonly buffer K { float k[]; };
layout(std430, binding = 1) readonly buffer V { float v[]; };
layout(std430, binding = 2) readonly buffer P { int pos[]; };
layout(std430, binding = 5) readonly buffer SL { int slot[]; };

#include "kv_cache.glsl"

#ifdef KV_F16
layout(std430, binding = 3) writeonly buffer KC { uint kc[]; };
layout(std430, binding = 4) writeonly buffer VC { uint vc[]; };

void main() {
    uint g = global_index();
    if (g >= pc.n * KVW / 2u) return;
    uint b = g / (KVW / 2u), i = 2u * (g % (KVW / 2u));
    uint o = (cache_row(b) * KVW + i) / 2u;
    uint src = b * KVW + i;
    kc[o] = half_bits(k[src]) | (half_bits(k[src + 1u]) << 16);
    vc[o] = half_bits(v[src]) | (half_bits(v[src + 1u]) << 16);
}
#else
layout(std430, binding = 3) writeonly buffer KC { float kc[]; };
layout(std430, binding = 4) writeonly buffer VC { float vc[]; };

void main() {
    uint g = global_index();
    if (g >= pc.n * KVW) return;
    uint b = g / KVW, i = g % KVW;
    uint o = cache_row(b) * KVW + i;
    kc[o] = k[g];
    vc[o] = v[g];
}
#endif
