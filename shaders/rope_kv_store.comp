#version 450
// rope.comp on q and on k by the same positions, then kv_store.comp's append of k and v to the layer's cache, in
// one dispatch: per batch row, one invocation per pair of q values (rotated in place) and one per two adjacent
// k values, each rotated from its pair with rope.comp's arithmetic into the cache (k itself is left as it
// was: no later op reads it), with the two v values beside them. Cache rows as in kv_store.comp (slots, layers
// in pc.aux); KV_F16: an f16 cache, the two values one word.
#extension GL_GOOGLE_include_directive : require
#include "common.glsl"
layout(constant_id = 1) const uint QW = 2;    // q values per row
layout(constant_id = 2) const uint KVW = 2;   // k (and v) values per row
layout(constant_id = 3) const uint HD = 2;
layout(constant_id = 4) const uint NEOX = 0;
layout(constant_id = 5) const uint SEQ = 1;
layout(constant_id = 6) const uint NS = 1;
const uint HALF = HD / 2u;

layout(std430, binding = 0) buffer Qb { float q[]; };
layout(std430, binding = 1) readonly buffer K { float k[]; };
layout(std430, binding = 2) readonly buffer V { float v[]; };
layout(std430, binding = 3) readonly buffer P { int pos[]; };
layout(std430, binding = 4) readonly buffer T { vec2 cs[]; };
layout(std430, binding = 7) readonly buffer SL { int slot[]; };
#ifdef KV_F16
layout(std430, binding = 5) writeonly buffer KC { uint kc[]; };
layout(std430, binding = 6) writeonly buffer VC { uint vc[]; };
#else
layout(std430, binding = 5) writeonly buffer KC { float kc[]; };
layout(std430, binding = 6) writeonly buffer VC { float vc[]; };
#endif
#include "kv_cache.glsl"

// Value j of row b's k after RoPE: the pair it belongs to, rotated as rope.comp rotates it.
float rotated_k(uint b, uint j) {
    uint h = j / HD, d = j % HD;
    uint i = NEOX != 0u ? d % HALF : d / 2u;
    uint e0 = b * KVW + h * HD + (NEOX != 0u ? i : 2u * i);
    uint e1 = e0 + (NEOX != 0u ? HALF : 1u);
    vec2 c = cs[uint(pos[b]) * HALF + i];
    float x0 = k[e0], x1 = k[e1];
    bool first = NEOX != 0u ? d < HALF : (d & 1u) == 0u;
    return first ? x0 * c.x - x1 * c.y : x0 * c.y + x1 * c.x;
}

void main() {
    uint g = global_index();
    uint q_pairs = QW / 2u, per_row = q_pairs + KVW / 2u;
    if (g >= pc.n * per_row) return;
    uint b = g / per_row, p = g % per_row;
    if (p < q_pairs) {
        uint h = p / HALF, i = p % HALF;
        uint e0 = b * QW + h * HD + (NEOX != 0u ? i : 2u * i);
        uint e1 = e0 + (NEOX != 0u ? HALF : 1u);
        vec2 c = cs[uint(pos[b]) * HALF + i];
        float x0 = q[e0], x1 = q[e1];
        q[e0] = x0 * c.x - x1 * c.y;
        q[e1] = x0 * c.y + x1 * c.x;
        return;
    }
    uint j = 2u * (p - q_pairs), src = b * KVW + j;
    float k0 = rotated_k(b, j), k1 = rotated_k(b, j + 1u);
#ifdef KV_F16
    uint o = (cache_row(b) * KVW + j) / 2u;
    kc[o] = half_bits(k0) | (half_bits(k1) << 16);
    vc[o] = half_bits(v[src]) | (half_bits(v[src + 1u]) << 16);
#else
    uint o = cache_row(b) * KVW + j;
    kc[o] = k0;
    kc[o + 1u] = k1;
    vc[o] = v[src];
    vc[o + 1u] = v[src + 1u];
#endif
}
