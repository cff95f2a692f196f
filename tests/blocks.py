"""Random weights in every native layout and their independent decoding (numpy for floats, gguf-py for
blocks), shared by the CPU kernel and the Vulkan shader tests."""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType, quants

from engine.weight_types import WEIGHT_TYPES, weight_type

QUANT = tuple(t.name for t in WEIGHT_TYPES.values() if t.quantized)
FLOAT = tuple(t.name for t in WEIGHT_TYPES.values() if not t.quantized)
# byte offsets of the fp16 fields of a block: the scale d, then the offset m (q41, q51) or dmin (K-quants)
HALF_FIELDS = {
    "q40": (0,),
    "q41": (0, 2),
    "q50": (0,),
    "q51": (0, 2),
    "q80": (0,),
    "q4k": (0, 2),
    "q5k": (0, 2),
    "q6k": (208,),
}


def ggml(wtype: str) -> GGMLQuantizationType:
    return GGMLQuantizationType(weight_type(wtype).ggml_id)


def random_weight(wtype: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """A weight in its native layout: random codes (any bytes are valid codes and 6-bit scales), finite fp16
    fields: positive scales d and dmin, an any-sign offset m."""
    if wtype == "f32":
        return rng.standard_normal((rows, cols)).astype(np.float32)
    if wtype == "f16":
        return rng.standard_normal((rows, cols)).astype(np.float16)
    if wtype == "bf16":
        return (rng.standard_normal((rows, cols)).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    wt = weight_type(wtype)
    nb = cols // wt.block_values
    blocks = rng.integers(0, 256, (rows, nb, wt.block_bytes), dtype=np.uint8)
    ranges = [(0.001, 0.05), (-0.4, 0.1) if wtype in ("q41", "q51") else (0.0005, 0.01)]
    for at, (lo, hi) in zip(HALF_FIELDS[wtype], ranges, strict=False):
        blocks[..., at : at + 2] = rng.uniform(lo, hi, (rows, nb, 1)).astype(np.float16).view(np.uint8)
    return blocks.reshape(rows, nb * wt.block_bytes)


def decode(data: np.ndarray, wtype: str) -> np.ndarray:
    """float64 (rows, cols) values of a weight in its native layout."""
    if wtype in ("f32", "f16"):
        return data.astype(np.float64)
    if wtype == "bf16":
        return (data.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return quants.dequantize(np.ascontiguousarray(data), ggml(wtype)).astype(np.float64)


def q80_blocks(x: np.ndarray) -> np.ndarray:
    """f32 rows as Q8_0 activation blocks, by gguf-py's quantiser."""
    return quants.quantize(x, GGMLQuantizationType.Q8_0).reshape(x.shape[0], -1)


def within(got: np.ndarray, want: np.ndarray, bound: np.ndarray) -> None:
    """|got - want| within 1e-5 of the sum of the terms' magnitudes (float32 accumulation in any order)."""
    err = np.abs(got - want)
    assert np.all(err <= 1e-5 * bound + 1e-30), f"max error {err.max():.3g}, bound {bound.max():.3g}"
