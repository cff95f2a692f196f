// The KV cache's row of a batch row and its f16 rounding, shared by kv_store.comp and rope_kv_store.comp;
// the includer declares SEQ, NS and the `pos` and `slot` buffers first.

// The cache row of batch row b: its position within its slot's rows of this layer.
uint cache_row(uint b) {
    uint sl = NS > 1u ? min(uint(slot[b]), NS - 1u) : 0u;
    return (pc.aux * NS + sl) * SEQ + uint(pos[b]);
}

// The IEEE half bits of f rounded to nearest even, as the CPU backend and numpy round (Vulkan leaves the
// rounding of packHalf2x16 to the implementation: lavapipe truncates).
uint half_bits(float f) {
    uint x = floatBitsToUint(f);
    uint sign = (x >> 16) & 0x8000u, e = (x >> 23) & 0xffu, m = x & 0x7fffffu;
    if (e == 0xffu) return sign | 0x7c00u | (m != 0u ? 0x200u : 0u);  // infinity, NaN
    int he = int(e) - 112;  // the half's biased exponent
    if (he >= 31) return sign | 0x7c00u;  // beyond the largest half: infinity
    uint shift = 13u, bits = m;
    if (he <= 0) {  // a subnormal half (or zero): the implicit bit joins the mantissa, shifted further
        if (he < -10) return sign;
        shift = uint(14 - he);
        bits = m | 0x800000u;
    }
    uint h = bits >> shift, rest = bits & ((1u << shift) - 1u), half_way = 1u << (shift - 1u);
    h |= he > 0 ? uint(he) << 10 : 0u;
    if (rest > half_way || (rest == half_way && (h & 1u) != 0u)) h += 1u;  // a carry rounds into the exponent
    return sign | h;
}
