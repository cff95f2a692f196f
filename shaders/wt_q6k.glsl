// Q6_K super-blocks (210 bytes: ql[128], qh[64], 16 int8 scales, fp16 d), split at upload into two aligned
// arrays of the same total size: the first 208 bytes (13 uvec4: ql 0..7, qh 8..11, scales 12) and the d
// (two per word, each row padded to a word). Block i = 4h + t (32 values) of the 8 is quarter t of half h:
// value l takes the low (t < 2) or high nibble of ql[64h + 32(t & 1) + l] and bits 2t, 2t + 1 of
// qh[32h + l]; value = d * sc * (q - 32), sc = scales[8h + 2t] for l < 16, scales[8h + 2t + 1] above. The two
// 16-value scales are folded into the decoded values, so wscale is d alone.
#ifndef WEIGHT_UP
#define WPARTS 2
struct WBlock { uvec4 l0; uvec4 l1; uvec4 h0; uvec4 h1; uint lshift; uint hshift; vec2 sc; float d; };

// The four values of a code word and a high-bit word already shifted to their nibbles and bit pairs, times
// their 16-value scale.
vec4 q6k_vals(uint w, uint h, float sc) {
    uvec4 q = (uvec4(w, w >> 8, w >> 16, w >> 24) & 0xFu) | ((uvec4(h, h >> 8, h >> 16, h >> 24) & 3u) << 4);
    return (vec4(q) - 32.0) * sc;
}

vec4 wvec(WBlock b, uint k) {
    uint w = (k < 4u ? b.l0[k] : b.l1[k - 4u]) >> b.lshift;
    uint h = (k < 4u ? b.h0[k] : b.h1[k - 4u]) >> b.hshift;
    return q6k_vals(w, h, k < 4u ? b.sc.x : b.sc.y);
}
float wscale(WBlock b) { return b.d; }
#define HAS_WPART
#endif
layout(std430, binding = WBIND) readonly buffer WN(W) { uvec4 WN(wk)[]; };
layout(std430, binding = WBIND + 1) readonly buffer WN(WD) { uint WN(wd)[]; };

WBlock WN(load_block)(uint r, uint j) {
    uint s = j >> 3, o = 13u * (r * NS + s), h = (j >> 2) & 1u, t = j & 3u;
    uint lo = o + 4u * h + 2u * (t & 1u), ho = o + 8u + 2u * h;
    uint sw = WN(wk)[o + 12u][2u * h + (t >> 1)] >> (16u * (t & 1u));   // scale bytes 8h + 2t, 8h + 2t + 1
    vec2 sc = vec2(float(int(sw << 24) >> 24), float(int(sw << 16) >> 24));
    float d = half_at(WN(wd)[r * NSH + (s >> 1)], s & 1u);
    return WBlock(WN(wk)[lo], WN(wk)[lo + 1u], WN(wk)[ho], WN(wk)[ho + 1u], 4u * (t >> 1), 2u * t, sc, d);
}

// A mat-vec lane's quarter k of block j: one ql word, one qh word, the scale word holding its scale byte
// 8h + 2t + k / 4 and the d word, not the whole block.
vec4 WN(wpart)(uint r, uint j, uint k, out float d, out float m) {
    uint s = j >> 3, o = 13u * (r * NS + s), h = (j >> 2) & 1u, t = j & 3u, e = k >> 2, c = k & 3u;
    uint w = WN(wk)[o + 4u * h + 2u * (t & 1u) + e][c] >> (4u * (t >> 1));
    uint hb = WN(wk)[o + 8u + 2u * h + e][c] >> (2u * t);
    uint sw = WN(wk)[o + 12u][2u * h + (t >> 1)] >> (16u * (t & 1u) + 8u * e);
    d = half_at(WN(wd)[r * NSH + (s >> 1)], s & 1u);
    m = 0.0;
    return q6k_vals(w, hb, float(int(sw << 24) >> 24));
}
