// Q4_1 blocks, re-packed at upload into two aligned arrays of the same total size: the 16 nibble bytes of
// every block (one uvec4) and one word per block holding its fp16 scale d (low half) and minimum m (high half).
// Byte j of a block holds value j (low nibble) and value j + 16 (high nibble); value = d * nibble + m.
#ifndef WEIGHT_UP
#define HAS_MIN
#define WPARTS 2
struct WBlock { uvec4 q; vec2 dm; };

vec4 wvec(WBlock b, uint k) {
    uint w = b.q[k & 3u] >> (4u * (k >> 2));
    return vec4(uvec4(w, w >> 8, w >> 16, w >> 24) & 0xFu);
}
float wscale(WBlock b) { return b.dm.x; }
float wmin(WBlock b) { return b.dm.y; }
// INT_DOT: the codes of values 4k..4k+3, a byte each (0..15); value = d * code + m.
uint wcodes(WBlock b, uint k) { return (b.q[k & 3u] >> (4u * (k >> 2))) & 0x0F0F0F0Fu; }
#endif
layout(std430, binding = WBIND) readonly buffer WN(WQ) { uvec4 WN(wq)[]; };
layout(std430, binding = WBIND + 1) readonly buffer WN(WD) { uint WN(wdm)[]; };

WBlock WN(load_block)(uint r, uint j) {
    uint i = r * NB + j;
    return WBlock(WN(wq)[i], unpackHalf2x16(WN(wdm)[i]));
}
