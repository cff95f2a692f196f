#version 450
// f32 rows -> Q80 blocks (34 bytes: fp16 d = amax/127, then 32 int8 round-half-even(x / d)) into a region of
// the destination rows: blocks SLOT0 .. SLOT0 + NB - 1 of every DST_BLOCKS-block row (the whole row for a
// plain quantisation, one node's slot of the zq pipe otherwise). Blocks are 34 bytes, so one invocation
// writes a 68-byte (17-word) pair of consecutive blocks of the flat destination buffer; bytes of blocks
// outside the region are read back and kept.
#extension GL_GOOGLE_include_directive : require
#include "common.glsl"
layout(constant_id = 1) const uint NB = 1;            // blocks per source row (source width / 32)
layout(constant_id = 2) const uint DST_BLOCKS = 1;    // blocks per destination row
layout(constant_id = 3) const uint SLOT0 = 0;         // first block of the region in a destination row

layout(std430, binding = 0) readonly buffer X { float x[]; };
layout(std430, binding = 1) buffer Q { uint q[]; };

uint dbits[2];
int qv[2][32];
bool live[2];

void quantize(uint k, uint g) {
    uint row = g / DST_BLOCKS, j = g % DST_BLOCKS;
    live[k] = row < pc.n && j >= SLOT0 && j < SLOT0 + NB;
    if (!live[k]) return;
    uint base = row * NB * 32u + (j - SLOT0) * 32u;
    float amax = 0.0;
    for (uint i = 0u; i < 32u; i++) amax = max(amax, abs(x[base + i]));
    float d = amax / 127.0;
    float id = d != 0.0 ? 1.0 / d : 0.0;
    dbits[k] = f16_bits(d);
    for (uint i = 0u; i < 32u; i++) qv[k][i] = int(roundEven(x[base + i] * id));
}

uint byte_of(uint i) {     // byte i (0..67) of the pair
    uint k = i < 34u ? 0u : 1u, o = i - 34u * k;
    return o < 2u ? (dbits[k] >> (8u * o)) & 0xFFu : uint(qv[k][o - 2u]) & 0xFFu;
}

void main() {
    uint p = global_index();
    if (2u * p >= pc.n * DST_BLOCKS) return;
    quantize(0u, 2u * p);
    quantize(1u, 2u * p + 1u);
    if (!live[0] && !live[1]) return;
    for (uint w = 0u; w < 17u; w++) {
        bool l0 = live[(4u * w) / 34u], l3 = live[(4u * w + 3u) / 34u];
        if (!l0 && !l3) continue;
        uint word = 17u * p + w;
        uint old = (l0 && l3) ? 0u : q[word];
        uint v = 0u;
        for (uint c = 0u; c < 4u; c++) {
            uint i = 4u * w + c;
            uint by = live[i / 34u] ? byte_of(i) : (old >> (8u * c)) & 0xFFu;
            v |= by << (8u * c);
        }
        q[word] = v;
    }
}
