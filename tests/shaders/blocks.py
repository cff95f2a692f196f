"""Random quantised weights and their independent decoding (gguf-py) for the shader tests."""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType, quants

from engine.weight_types import weight_type

# byte offsets of the fp16 fields of a block (scales, minimums): kept small and finite in random blocks
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


def random_blocks(wtype: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """(rows, row_bytes) random valid blocks: random bytes, fp16 fields set to small finite values."""
    wt = weight_type(wtype)
    blocks = rng.integers(0, 256, (rows, cols // wt.block_values, wt.block_bytes), dtype=np.uint8)
    for off in HALF_FIELDS[wtype]:
        halves = rng.uniform(-0.02, 0.02, blocks.shape[:2]).astype(np.float16)
        blocks[:, :, off : off + 2] = halves.view(np.uint8).reshape(*blocks.shape[:2], 2)
    return blocks.reshape(rows, -1)


def decoded(wtype: str, data: np.ndarray) -> np.ndarray:
    """gguf-py's de-quantisation of (rows, row_bytes) blocks, as float64."""
    return quants.dequantize(data, GGMLQuantizationType(weight_type(wtype).ggml_id)).astype(np.float64)


def q80_blocks(x: np.ndarray) -> np.ndarray:
    """f32 rows as Q8_0 activation blocks, by gguf-py's quantiser."""
    return quants.quantize(x, GGMLQuantizationType.Q8_0).reshape(x.shape[0], -1)


def within(got: np.ndarray, want: np.ndarray, bound: np.ndarray) -> None:
    """|got - want| within 1e-5 of the sum of the terms' magnitudes (float32 accumulation in any order)."""
    err = np.abs(got - want)
    assert np.all(err <= 1e-5 * bound + 1e-30), f"max error {err.max():.3g}, bound {bound.max():.3g}"
