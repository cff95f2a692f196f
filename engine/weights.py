"""Weight tensors kept in their file's native form (memory-mapped views, never de-quantized at load)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine.config import ModelConfig
from engine.errors import DllamaError

BLOCK = 32  # elements per quantized block (Q40, Q41, Q80)
BLOCK_BYTES = {"q40": 18, "q41": 20, "q80": 34}
ELEM_BYTES = {"f32": 4, "f16": 2, "bf16": 2}
WEIGHT_TYPES = ("f32", "f16", "bf16", "q40", "q41", "q80")


def map_file(path: str) -> np.memmap:
    """A read-only memory map of a whole model file; a missing or unreadable file is a DllamaError."""
    try:
        return np.memmap(path, dtype=np.uint8, mode="r")
    except FileNotFoundError:
        raise DllamaError(f"{path}: no such file") from None
    except (OSError, ValueError) as e:
        raise DllamaError(f"{path}: cannot read ({e})") from None


def row_bytes(dtype: str, cols: int) -> int:
    """Bytes of one row of `cols` values stored as `dtype`."""
    if dtype in BLOCK_BYTES:
        return cols // BLOCK * BLOCK_BYTES[dtype]
    return cols * ELEM_BYTES[dtype]


@dataclass
class Weight:
    """A 2-D (rows x cols, cols contiguous) or 1-D (rows = 1) tensor in its native encoding.

    `data` layout by dtype: f32 -> float32 (rows, cols); f16 -> float16 (rows, cols);
    bf16 -> uint16 bit patterns (rows, cols); q40/q41/q80 -> uint8 (rows, row_bytes) holding whole blocks.
    """

    name: str
    dtype: str
    rows: int
    cols: int
    data: np.ndarray

    @property
    def nbytes(self) -> int:
        return self.rows * row_bytes(self.dtype, self.cols)


@dataclass
class Model:
    """A loaded model file: config, weights by GGUF-style name, and the metadata a tokenizer may need."""

    config: ModelConfig
    weights: dict[str, Weight]
    path: str
    file_size: int
    kind: str  # "gguf" or "m"
    metadata: dict[str, Any] = field(default_factory=dict)

    def weight(self, name: str) -> Weight:
        return self.weights[name]

    @property
    def classifier(self) -> Weight:
        """output.weight, or the embedding when the model ties them."""
        return self.weights.get("output.weight") or self.weights["token_embd.weight"]
