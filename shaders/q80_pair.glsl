// A pair of Q80 blocks (68 bytes: 17 words) from the 64 values in `vals`, with quantize_q80.comp's arithmetic:
// fp16 d = amax / 127, then int8 round-half-even(v / d). q80_quantize fills the pair, q80_word(w) is its word w.
float vals[64];
uint q80_d[2];
int q80_q[64];

void q80_quantize() {
    for (uint k = 0u; k < 2u; k++) {
        float amax = 0.0;
        for (uint i = 0u; i < 32u; i++) amax = max(amax, abs(vals[32u * k + i]));
        float d = amax / 127.0;
        float id = d != 0.0 ? 1.0 / d : 0.0;
        q80_d[k] = f16_bits(d);
        for (uint i = 0u; i < 32u; i++) q80_q[32u * k + i] = int(roundEven(vals[32u * k + i] * id));
    }
}

uint q80_word(uint w) {
    uint word = 0u;
    for (uint c = 0u; c < 4u; c++) {
        uint i = 4u * w + c, k = i < 34u ? 0u : 1u, o = i - 34u * k;
        uint by = o < 2u ? (q80_d[k] >> (8u * o)) & 0xFFu : uint(q80_q[32u * k + o - 2u]) & 0xFFu;
        word |= by << (8u * c);
    }
    return word;
}
