// The 6-bit scale and minimum of sub-block i (0..7) of a Q4_K / Q5_K super-block, from its 12 packed bytes
// s[0..11] (bytes 4..15 of the super-block): lo, mid and hi are their words s[0..3], s[4..7], s[8..11]. For
// i < 4: sc = s[i] & 63, mn = s[i+4] & 63; for i >= 4 the low four bits come from s[i+4] and the top two
// from the spare bits of s[i-4] / s[i]. hi is only read for i >= 4, so a mat-vec lane of a sub-block i < 4
// may pass anything there.
uvec2 scale_min_words(uint lo, uint mid, uint hi, uint i) {
    uint sh = 8u * (i & 3u), a = (lo >> sh) & 0xFFu, b = (mid >> sh) & 0xFFu;
    if (i < 4u) return uvec2(a & 63u, b & 63u);
    uint s = (hi >> sh) & 0xFFu;
    return uvec2((s & 15u) | ((a >> 6) << 4), (s >> 4) | ((b >> 6) << 4));
}

// Sub-block i's scale and minimum as values: (d * sc, -dmin * mn), from the head's fp16 d/dmin word dm and
// its scale words (as for scale_min_words).
vec2 scale_min_values(uint dm, uint lo, uint mid, uint hi, uint i) {
    vec2 f = unpackHalf2x16(dm);
    uvec2 sm = scale_min_words(lo, mid, hi, i);
    return vec2(f.x * float(sm.x), -f.y * float(sm.y));
}
