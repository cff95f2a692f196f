// The 6-bit scale and minimum of sub-block i (0..7) of a Q4_K / Q5_K super-block, from its 12 packed bytes
// (bytes 4..15 of the super-block: words 1..3 of its first uvec4). For i < 4: sc = s[i] & 63, mn = s[i+4] &
// 63; for i >= 4 the low four bits come from s[i+4] and the top two from the spare bits of s[i-4] / s[i].
uint scale_byte(uvec4 head, uint i) { return (head[1u + (i >> 2)] >> (8u * (i & 3u))) & 0xFFu; }

uvec2 scale_min(uvec4 head, uint i) {
    if (i < 4u) return uvec2(scale_byte(head, i) & 63u, scale_byte(head, i + 4u) & 63u);
    uint s = scale_byte(head, i + 4u);
    uint sc = (s & 15u) | ((scale_byte(head, i - 4u) >> 6) << 4);
    return uvec2(sc, (s >> 4) | ((scale_byte(head, i) >> 6) << 4));
}
