"""Numpy reference codecs of every registered weight encoding (GGML block layouts, spec section 2).

The `.m` converter re-encodes weights through them and tests build fixtures with them; they are written for
clarity, not speed (the kernels live in the backends). Block geometry comes from engine/weight_types.py.
"""

from __future__ import annotations

import numpy as np

from engine.errors import DllamaError
from engine.weight_types import WeightType, weight_type

# ----------------------------------------------------------------------------------------------------------
# Shared helpers


def _blocks(x: np.ndarray, wt: WeightType) -> np.ndarray:
    """float32 values cut into blocks of `wt.block_values`; a block never straddles two rows."""
    a = np.asarray(x, dtype=np.float32)
    cols = a.shape[-1] if a.ndim else 1
    if cols % wt.block_values:
        raise DllamaError(
            f"{wt.ggml_name} quantisation: rows of {cols} values are not a multiple of the block size "
            f"{wt.block_values}"
        )
    return a.reshape(-1, wt.block_values)


def _f16_bytes(v: np.ndarray) -> np.ndarray:
    """Per-block scales as (n, 2) bytes of IEEE half."""
    return np.asarray(v, dtype=np.float32).astype("<f2").view(np.uint8).reshape(-1, 2)


def _f16_at(b: np.ndarray, start: int) -> np.ndarray:
    """The half stored at byte `start` of every block, as float32 (n, 1)."""
    return np.ascontiguousarray(b[:, start : start + 2]).view("<f2").astype(np.float32)


def _inverse(d: np.ndarray) -> np.ndarray:
    """1 / d where d != 0, else 0 (an all-zero block encodes as zeros)."""
    with np.errstate(divide="ignore"):
        return np.where(d != 0, np.float32(1.0) / d, np.float32(0.0)).astype(np.float32)


def _nibbles(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Pack two arrays of 4-bit codes into bytes (lo in the low nibble)."""
    return ((lo & 15) | ((hi & 15) << 4)).astype(np.uint8)


def _signed_extreme(g: np.ndarray) -> np.ndarray:
    """Per row of g the value of largest magnitude, with its sign (the first one on ties)."""
    return np.take_along_axis(g, np.abs(g).argmax(axis=-1)[..., None], axis=-1)[..., 0]


# ----------------------------------------------------------------------------------------------------------
# Legacy blocks of 32 values: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0


def quantize_q40(x: np.ndarray) -> np.ndarray:
    """distributed-llama Q40 (= GGUF Q4_0): per block d = m / -8, m the signed extreme; 18 bytes per block."""
    g = _blocks(x, weight_type("q40"))
    gmax, gmin = g.max(axis=1), g.min(axis=1)
    d = np.where(-gmin > gmax, gmin, gmax) / np.float32(-8.0)
    q = np.clip(np.trunc(g * _inverse(d)[:, None] + np.float32(8.5)), 0, 15).astype(np.uint8)
    return np.concatenate([_f16_bytes(d), _nibbles(q[:, :16], q[:, 16:])], axis=1).reshape(-1)


def quantize_q80(x: np.ndarray) -> np.ndarray:
    """distributed-llama Q80 (= GGUF Q8_0): d = max|x| / 127, q = round-half-even(x / d); 34 bytes a block."""
    g = _blocks(x, weight_type("q80"))
    d = np.abs(g).max(axis=1) / np.float32(127.0)
    q = np.round(g * _inverse(d)[:, None]).astype(np.int8)
    return np.concatenate([_f16_bytes(d), q.view(np.uint8)], axis=1).reshape(-1)


def _min_max_codes(g: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric codes 0..levels of each block: d = (max - min) / levels, x ≈ d·q + min."""
    lo, hi = g.min(axis=1), g.max(axis=1)
    d = (hi - lo) / np.float32(levels)
    q = np.clip(np.trunc((g - lo[:, None]) * _inverse(d)[:, None] + np.float32(0.5)), 0, levels)
    return d, lo, q.astype(np.uint8)


def _high_bits(q: np.ndarray) -> np.ndarray:
    """Bit 4 of each of a block's 32 codes as a little-endian uint32 (4 bytes)."""
    return np.packbits((q >> 4) & 1, axis=1, bitorder="little")


def quantize_q41(x: np.ndarray) -> np.ndarray:
    """GGUF Q4_1: d = (max - min) / 15, m = min, q = round((x - m) / d); 20 bytes per block."""
    d, m, q = _min_max_codes(_blocks(x, weight_type("q41")), 15)
    return np.concatenate([_f16_bytes(d), _f16_bytes(m), _nibbles(q[:, :16], q[:, 16:])], axis=1).reshape(-1)


def quantize_q50(x: np.ndarray) -> np.ndarray:
    """GGUF Q5_0: d = m / -16 (m the signed extreme), 5-bit codes offset by 16; 22 bytes per block."""
    g = _blocks(x, weight_type("q50"))
    d = _signed_extreme(g) / np.float32(-16.0)
    q = np.clip(np.trunc(g * _inverse(d)[:, None] + np.float32(16.5)), 0, 31).astype(np.uint8)
    return np.concatenate([_f16_bytes(d), _high_bits(q), _nibbles(q[:, :16], q[:, 16:])], axis=1).reshape(-1)


def quantize_q51(x: np.ndarray) -> np.ndarray:
    """GGUF Q5_1: d = (max - min) / 31, m = min, 5-bit codes; 24 bytes per block."""
    d, m, q = _min_max_codes(_blocks(x, weight_type("q51")), 31)
    parts = [_f16_bytes(d), _f16_bytes(m), _high_bits(q), _nibbles(q[:, :16], q[:, 16:])]
    return np.concatenate(parts, axis=1).reshape(-1)


def _legacy_codes(b: np.ndarray, qs_start: int, qh_start: int | None) -> np.ndarray:
    """The 32 codes of each legacy block: nibbles at `qs_start` (+16 from the qh bits where present)."""
    qs = b[:, qs_start : qs_start + 16]
    q = np.concatenate([qs & 15, qs >> 4], axis=1)
    if qh_start is not None:
        q = q | (np.unpackbits(b[:, qh_start : qh_start + 4], axis=1, bitorder="little") << 4)
    return q.astype(np.float32)


def _decode_legacy(b: np.ndarray, dtype: str) -> np.ndarray:
    d = _f16_at(b, 0)
    if dtype == "q80":
        return d * b[:, 2:].view(np.int8).astype(np.float32)
    if dtype == "q40":
        return d * (_legacy_codes(b, 2, None) - 8)
    if dtype == "q50":
        return d * (_legacy_codes(b, 6, 2) - 16)
    m = _f16_at(b, 2)
    if dtype == "q41":
        return d * _legacy_codes(b, 4, None) + m
    return d * _legacy_codes(b, 8, 4) + m  # q51


# ----------------------------------------------------------------------------------------------------------
# K-quant super-blocks of 256 values: Q4_K, Q5_K (8 sub-blocks of 32, scale + min), Q6_K (16 of 16, scale)

_SHRINK = np.linspace(1.0, 0.7, 7, dtype=np.float32)  # candidate narrowings of a sub-block's [min, max] range


def _scale_min_search(g: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """Per sub-block (rows of g) a scale s and a min m >= 0 for x ≈ s·q - m, q in 0..levels: the [min, max]
    range, narrowed by each factor of _SHRINK, whose rounding error is least."""
    lo, hi = np.minimum(g.min(axis=-1), 0), g.max(axis=-1)
    best_s, best_m = np.zeros_like(lo), np.zeros_like(lo)
    best_err = np.full(lo.shape, np.inf, dtype=np.float32)
    for f in _SHRINK:
        s, m = (hi - lo) * f / levels, -lo * f
        q = np.clip(np.rint((g + m[..., None]) * _inverse(s)[..., None]), 0, levels)
        err = np.square(s[..., None] * q - m[..., None] - g).sum(axis=-1)
        better = err < best_err
        best_s, best_m, best_err = (
            np.where(better, s, best_s),
            np.where(better, m, best_m),
            np.minimum(err, best_err),
        )
    return best_s, best_m


def _super_scale(v: np.ndarray) -> np.ndarray:
    """A super-block's f16 scale D = max(v) / 63 for 6-bit multiples of it (as float32, already rounded)."""
    return (v.max(axis=-1) / np.float32(63.0)).astype(np.float16).astype(np.float32)


def _six_bit_choices(v: np.ndarray, big: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """v / D rounded down and up, within 0..63: the two 6-bit multiples worth trying for each sub-block."""
    r = v * _inverse(big)[:, None]
    return np.clip(np.floor(r), 0, 63).astype(np.uint8), np.clip(np.ceil(r), 0, 63).astype(np.uint8)


def _pack_k_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """The 12 bytes of eight 6-bit scales and mins (GGML get_scale_min_k4 layout)."""
    out = np.empty((sc.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = (mn[:, :4] & 63) | ((mn[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4)
    return out


def _unpack_k_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eight 6-bit scales and mins of each super-block from its 12 scale bytes."""
    sc = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 15) | ((s[:, 0:4] >> 6) << 4)], axis=1)
    mn = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _k_codes(x: np.ndarray, dtype: str, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """Header bytes (d, dmin, scales) and codes (n, 8, 32) of Q4_K / Q5_K super-blocks: per sub-block the
    6-bit scale and min (each rounded down or up) whose codes reproduce it best."""
    g = _blocks(x, weight_type(dtype)).reshape(-1, 8, 32)
    s, m = _scale_min_search(g, levels)
    d, dmin = _super_scale(s), _super_scale(m)
    best_err = np.full(s.shape, np.inf, dtype=np.float32)
    sc, mn, q = np.zeros(s.shape, np.uint8), np.zeros(s.shape, np.uint8), np.zeros(g.shape, np.uint8)
    for sc_try in _six_bit_choices(s, d):
        for mn_try in _six_bit_choices(m, dmin):
            step = d[:, None] * sc_try.astype(np.float32)  # exactly what the decoder multiplies by
            offset = dmin[:, None] * mn_try.astype(np.float32)
            q_try = np.clip(np.rint((g + offset[..., None]) * _inverse(step)[..., None]), 0, levels)
            err = np.square(step[..., None] * q_try - offset[..., None] - g).sum(axis=-1)
            better = err < best_err
            sc, mn = np.where(better, sc_try, sc), np.where(better, mn_try, mn)
            q, best_err = np.where(better[..., None], q_try.astype(np.uint8), q), np.minimum(err, best_err)
    head = np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _pack_k_scales(sc, mn)], axis=1)
    return head, q


def _k_nibbles(q: np.ndarray) -> np.ndarray:
    """qs[128]: chunk c holds sub-block 2c in the low nibbles and 2c + 1 in the high ones."""
    return _nibbles(q[:, 0::2], q[:, 1::2]).reshape(-1, 128)


def quantize_q4k(x: np.ndarray) -> np.ndarray:
    """GGUF Q4_K: per 32-value sub-block a searched scale and min, 6-bit each under f16 d/dmin; 144 bytes."""
    head, q = _k_codes(x, "q4k", 15)
    return np.concatenate([head, _k_nibbles(q)], axis=1).reshape(-1)


def quantize_q5k(x: np.ndarray) -> np.ndarray:
    """GGUF Q5_K: Q4_K's scales with 5-bit codes (the fifth bits of sub-block i in bit i of qh); 176 bytes."""
    head, q = _k_codes(x, "q5k", 31)
    qh = np.zeros((q.shape[0], 32), dtype=np.uint8)
    for i in range(8):
        qh |= ((q[:, i] >> 4) & 1) << i
    return np.concatenate([head, qh, _k_nibbles(q)], axis=1).reshape(-1)


def quantize_q6k(x: np.ndarray) -> np.ndarray:
    """GGUF Q6_K: per 16-value sub-block an int8 scale (signed extreme / -32) under an f16 d; 210 bytes."""
    g = _blocks(x, weight_type("q6k")).reshape(-1, 16, 16)
    s = _signed_extreme(g) / np.float32(-32.0)
    d = (np.abs(s).max(axis=1) / np.float32(127.0)).astype(np.float16).astype(np.float32)
    sc = np.clip(np.rint(s * _inverse(d)[:, None]), -128, 127).astype(np.int8)
    step = d[:, None] * sc.astype(np.float32)
    q = np.clip(np.rint(g * _inverse(step)[..., None]) + 32, 0, 63).astype(np.uint8).reshape(-1, 2, 4, 32)
    ql = np.concatenate([_nibbles(q[:, :, 0], q[:, :, 2]), _nibbles(q[:, :, 1], q[:, :, 3])], axis=2)
    qh = (q[:, :, 0] >> 4) | ((q[:, :, 1] >> 4) << 2) | ((q[:, :, 2] >> 4) << 4) | ((q[:, :, 3] >> 4) << 6)
    parts = [ql.reshape(-1, 128), qh.reshape(-1, 64), sc.view(np.uint8), _f16_bytes(d)]
    return np.concatenate(parts, axis=1).reshape(-1)


def _decode_k(b: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "q6k":
        ql, qh = b[:, 0:128].reshape(-1, 2, 64), b[:, 128:192].reshape(-1, 2, 32)
        low = np.stack(
            [ql[:, :, :32] & 15, ql[:, :, 32:] & 15, ql[:, :, :32] >> 4, ql[:, :, 32:] >> 4], axis=2
        )
        high = np.stack([(qh >> shift) & 3 for shift in (0, 2, 4, 6)], axis=2)
        q = (low | (high << 4)).astype(np.float32).reshape(-1, 16, 16) - 32
        step = _f16_at(b, 208) * b[:, 192:208].view(np.int8).astype(np.float32)
        return (step[..., None] * q).reshape(-1, 256)
    sc, mn = _unpack_k_scales(b[:, 4:16])
    qs = b[:, -128:].reshape(-1, 4, 32)
    q = np.stack([qs & 15, qs >> 4], axis=2).reshape(-1, 8, 32)
    if dtype == "q5k":
        bits = np.unpackbits(b[:, 16:48], axis=1, bitorder="little").reshape(-1, 32, 8)
        q = q | (bits.transpose(0, 2, 1) << 4)
    step, offset = _f16_at(b, 0) * sc, _f16_at(b, 2) * mn
    return (step[..., None] * q.astype(np.float32) - offset[..., None]).reshape(-1, 256)


# ----------------------------------------------------------------------------------------------------------
# Dispatch by type name

_ENCODERS = {
    "q40": quantize_q40,
    "q41": quantize_q41,
    "q50": quantize_q50,
    "q51": quantize_q51,
    "q80": quantize_q80,
    "q4k": quantize_q4k,
    "q5k": quantize_q5k,
    "q6k": quantize_q6k,
}


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounded to nearest even; NaNs stay (quiet) NaNs."""
    n = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    nan = (n & 0x7FFFFFFF) > 0x7F800000
    rounded = (n + 0x7FFF + ((n >> 16) & 1)) >> 16
    return np.where(nan, (n >> 16) | 0x40, rounded).astype(np.uint16)


def quantize(x: np.ndarray, dtype: str) -> np.ndarray:
    """Encode float values as `dtype` in the Weight data layout, flattened (row length: whole blocks)."""
    wt = weight_type(dtype)
    if dtype == "f32":
        return np.asarray(x, dtype=np.float32).reshape(-1)
    if dtype == "f16":
        return np.asarray(x, dtype=np.float32).astype(np.float16).reshape(-1)
    if dtype == "bf16":
        return bf16_bits(x).reshape(-1)
    return _ENCODERS[wt.name](x)


def dequantize(data: np.ndarray, dtype: str, rows: int, cols: int) -> np.ndarray:
    """Decode a tensor stored as `dtype` (Weight.data layout, any strides) into float32 (rows, cols)."""
    wt = weight_type(dtype)
    raw = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    want = rows * wt.row_bytes(cols)
    if raw.size != want:
        raise DllamaError(f"{dtype} tensor of {rows} x {cols} values needs {want} bytes, got {raw.size}")
    if dtype == "f32":
        return raw.view("<f4").reshape(rows, cols).copy()
    if dtype == "f16":
        return raw.view("<f2").astype(np.float32).reshape(rows, cols)
    if dtype == "bf16":
        return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32).reshape(rows, cols)
    b = raw.reshape(-1, wt.block_bytes)
    out = _decode_k(b, dtype) if wt.block_values == 256 else _decode_legacy(b, dtype)
    return out.reshape(rows, cols)
