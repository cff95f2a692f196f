#version 450
// Causal GQA attention, pass 1 of 2 (split over positions, "flash decoding"): one workgroup per (batch row b,
// KV head g, block of HB of the query heads that read g, chunk c of CH cache positions). Query head h reads
// KV head (QOFF + h) / GROUP (GROUP: the model's query heads per KV head; QOFF: where this node's first query
// head sits in its first KV group), so a workgroup reads each K and V row of its chunk once for all its heads.
// Row b attends to cache rows 0..pos[b] of its slot (NS > 1: slot[b] picks rows slot*SEQ..; NS 1: the slot
// binding is unused). Per head, the chunk's rows are taken SB at a time with a running (online) softmax, and
// the chunk's max score m, sum of exp(score - m) l and exp-weighted sum of V rows go to a record of
// HD + 2 floats in `part`; attention_combine.comp merges the chunks. TILED (GPUs): the lanes copy SB key rows
// into shared memory, consecutive lanes reading consecutive words, and each lane scores (row, head) pairs
// from there; untiled (CPU implementations): each lane scores whole rows straight from the cache. The cache
// buffers hold several layers of NS * SEQ rows: pc.aux selects the layer. KV_F16: an f16 cache, two halves
// per word.
#extension GL_GOOGLE_include_directive : require
#include "common.glsl"
layout(constant_id = 1) const uint NH = 1;
layout(constant_id = 2) const uint NKV = 1;
layout(constant_id = 3) const uint HD = 2;       // even, at most 256
layout(constant_id = 4) const uint SEQ = 1;      // cache rows per slot (max sequence length)
layout(constant_id = 5) const uint GROUP = 1;
layout(constant_id = 6) const uint QOFF = 0;
layout(constant_id = 7) const uint NS = 1;       // KV slots
layout(constant_id = 8) const uint CH = 1;       // positions per chunk
layout(constant_id = 9) const uint HB = 1;       // query heads per workgroup, at most 8
layout(constant_id = 10) const uint SB = 1;      // positions per softmax block
layout(constant_id = 11) const uint TILED = 0;
const uint KVW = NKV * HD;
const uint NCH = (SEQ + CH - 1u) / CH;
const uint NHB = (GROUP + HB - 1u) / HB;
const uint WG = gl_WorkGroupSize.x;
const uint DPL = (HD + WG - 1u) / WG;            // value dimensions per lane: HB * DPL <= 32
const uint RW = HD + 1u;                         // padded tile row: lanes on consecutive rows hit other banks
const uint REC = HD + 2u;

layout(std430, binding = 0) readonly buffer Q { float q[]; };
layout(std430, binding = 1) readonly buffer P { int pos[]; };
layout(std430, binding = 2) readonly buffer SL { int slot[]; };
#ifdef KV_F16
layout(std430, binding = 3) readonly buffer KC { uint kc[]; };
layout(std430, binding = 4) readonly buffer VC { uint vc[]; };
#define K_AT(i) unpackHalf2x16(kc[(i) >> 1])[(i) & 1u]
#define V_AT(i) unpackHalf2x16(vc[(i) >> 1])[(i) & 1u]
#else
layout(std430, binding = 3) readonly buffer KC { float kc[]; };
layout(std430, binding = 4) readonly buffer VC { float vc[]; };
#define K_AT(i) kc[i]
#define V_AT(i) vc[i]
#endif
layout(std430, binding = 5) writeonly buffer PART { float part[]; };

shared float qs[HB * HD];                        // the heads' queries, pre-scaled by 1/sqrt(HD)
shared float kt[SB * RW * TILED + 1u];           // TILED: the block's key rows
shared float sc[SB * HB];                        // scores, then exp(score - running max), row-major
shared float ms[HB], ls[HB], rescale[HB];        // running max and sum per head, the block's factor

void main() {
    uint wg = wg_index();
    uint c = wg % NCH, rest = wg / NCH;
    uint hb = rest % NHB;
    rest /= NHB;
    uint g = rest % NKV, b = rest / NKV;
    if (b >= pc.n) return;
    uint last = uint(pos[b]), s0 = c * CH;
    if (s0 > last) return;
    uint s1 = min(s0 + CH, last + 1u);
    uint first = g * GROUP + hb * HB;            // first head of the block, counted from the node's KV head 0
    if (first >= QOFF + NH || first + HB <= QOFF) return;
    uint t = gl_LocalInvocationID.x;
    uint sl = NS > 1u ? min(uint(slot[b]), NS - 1u) : 0u;
    uint kvo = (pc.aux * NS + sl) * SEQ * KVW + g * HD;
    float scale = 1.0 / sqrt(float(HD));
    for (uint e = t; e < HB * HD; e += WG) {
        uint j = e / HD, i = hb * HB + j, h = first + j - QOFF;
        bool ok = i < GROUP && first + j >= QOFF && h < NH;
        qs[e] = ok ? q[(b * NH + h) * HD + e % HD] * scale : 0.0;
    }
    if (t < HB) {
        ms[t] = -3.402823e38;
        ls[t] = 0.0;
    }
    float acc[32];
    for (uint k = 0u; k < HB * DPL; k++) acc[k] = 0.0;
    for (uint blk = s0; blk < s1; blk += SB) {
        uint n = min(SB, s1 - blk);
        barrier();  // the previous block's readers of kt and sc are done (and qs is written)
        if (TILED != 0u) {
#ifdef KV_F16
            for (uint w = t; w < n * (HD / 2u); w += WG) {
                uint r = w / (HD / 2u), d = 2u * (w % (HD / 2u));
                vec2 pair = unpackHalf2x16(kc[(kvo + (blk + r) * KVW + d) >> 1]);
                kt[r * RW + d] = pair.x;
                kt[r * RW + d + 1u] = pair.y;
            }
#else
            for (uint w = t; w < n * HD; w += WG) {
                uint r = w / HD, d = w % HD;
                kt[r * RW + d] = kc[kvo + (blk + r) * KVW + d];
            }
#endif
            barrier();
            for (uint p = t; p < SB * HB; p += WG) {
                uint r = p % SB, j = p / SB;
                if (r >= n) continue;
                float a = 0.0;
                for (uint d = 0u; d < HD; d++) a += qs[j * HD + d] * kt[r * RW + d];
                sc[r * HB + j] = a;
            }
        } else {
            for (uint r = t; r < n; r += WG) {
                float a[8] = float[8](0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0);
                uint row = kvo + (blk + r) * KVW;
                for (uint d = 0u; d < HD; d++) {
                    float k = K_AT(row + d);
                    for (uint j = 0u; j < HB; j++) a[j] += qs[j * HD + d] * k;
                }
                for (uint j = 0u; j < HB; j++) sc[r * HB + j] = a[j];
            }
        }
        barrier();
        if (t < HB) {
            float m = ms[t], bm = m;
            for (uint r = 0u; r < n; r++) bm = max(bm, sc[r * HB + t]);
            float sum = 0.0;
            for (uint r = 0u; r < n; r++) {
                float e = exp(sc[r * HB + t] - bm);
                sc[r * HB + t] = e;
                sum += e;
            }
            float f = exp(m - bm);
            ms[t] = bm;
            ls[t] = ls[t] * f + sum;
            rescale[t] = f;
        }
        barrier();
        for (uint j = 0u; j < HB; j++) {
            float f = rescale[j];
            for (uint i = 0u; i < DPL; i++) acc[j * DPL + i] *= f;
        }
        for (uint r = 0u; r < n; r++) {
            uint row = kvo + (blk + r) * KVW;
            for (uint i = 0u; i < DPL; i++) {
                uint d = t + i * WG;
                if (d >= HD) break;
                float v = V_AT(row + d);
                for (uint j = 0u; j < HB; j++) acc[j * DPL + i] += sc[r * HB + j] * v;
            }
        }
    }
    for (uint j = 0u; j < HB; j++) {
        uint i = hb * HB + j, h = first + j - QOFF;
        if (i >= GROUP || first + j < QOFF || h >= NH) continue;
        uint rec = ((b * NH + h) * NCH + c) * REC;
        if (t == 0u) {
            part[rec] = ms[j];
            part[rec + 1u] = ls[j];
        }
        for (uint k = 0u; k < DPL; k++) {
            uint d = t + k * WG;
            if (d < HD) part[rec + 2u + d] = acc[j * DPL + k];
        }
    }
}
