"""Weight tensors kept in their file's native form (memory-mapped views, never de-quantized at load)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine.config import ModelConfig
from engine.errors import DllamaError
from engine.files import open_regular
from engine.weight_types import row_bytes, weight_type

BLOCK = 32  # values per Q80 activation block (and per legacy quantized weight block)
_PLAIN = {"f32": np.float32, "f16": np.float16, "bf16": np.uint16}  # element dtype of unquantized data


def map_file(path: str, limit: int | None = None) -> np.memmap:
    """A read-only memory map of a regular model file, whole or its first `limit` bytes; a missing, empty,
    unreadable or non-regular file is a DllamaError."""
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise DllamaError(f"{path}: empty file")
        length = size if limit is None else min(size, limit)
        try:
            return np.memmap(f, dtype=np.uint8, mode="r", shape=(length,))
        except (OSError, ValueError) as e:
            raise DllamaError(f"{path}: cannot map the file ({e})") from None


@dataclass
class Weight:
    """A 2-D (rows x cols, cols contiguous) or 1-D (rows = 1) tensor in its native encoding; with `experts`
    > 0, a stack of that many rows x cols matrices (a mixture-of-experts FFN), expert first.

    `data` layout: f32 -> float32 (rows, cols); f16 -> float16; bf16 -> uint16 bit patterns; quantized types
    -> uint8 (rows, row_bytes) of whole blocks; expert stacks have a leading expert axis. Rows are contiguous;
    the expert axis may be strided (a `.m` file interleaves the experts' gate, down and up matrices).
    """

    name: str
    dtype: str
    rows: int
    cols: int
    data: np.ndarray
    experts: int = 0

    @property
    def nbytes(self) -> int:
        return max(self.experts, 1) * self.rows * row_bytes(self.dtype, self.cols)

    @property
    def shape(self) -> tuple[int, ...]:
        """(experts, rows, cols) for expert stacks, else (rows, cols)."""
        return (self.experts, self.rows, self.cols) if self.experts else (self.rows, self.cols)


def weight_from_bytes(name: str, dtype: str, shape: tuple[int, ...], raw: np.ndarray) -> Weight:
    """A Weight viewing `raw` (uint8, exactly its bytes); shape is (cols,), (rows, cols) or (experts, rows,
    cols)."""
    wt = weight_type(dtype)
    experts, rows, cols = (0, *shape) if len(shape) == 2 else ((0, 1, *shape) if len(shape) == 1 else shape)
    lead = (experts,) if experts else ()
    if wt.quantized:
        data = raw.reshape(*lead, rows, wt.row_bytes(cols))
    else:
        data = raw.view(_PLAIN[dtype]).reshape(*lead, rows, cols)
    return Weight(name, dtype, rows, cols, data, experts)


def empty_weight(name: str, dtype: str, shape: tuple[int, ...]) -> Weight:
    """A zero-filled Weight of the given shape, to be filled in place (a worker receiving its slice)."""
    n = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
    raw = np.zeros(n * row_bytes(dtype, shape[-1]), np.uint8)
    return weight_from_bytes(name, dtype, shape, raw)


def vector_f32(w: Weight) -> np.ndarray:
    """A 1-D weight (norm scales, biases) decoded to float32: the one decoder both backends use."""
    if w.rows != 1 or w.experts:
        raise DllamaError(f"{w.name}: expected a vector, found a {w.rows}x{w.cols} matrix")
    flat = w.data.reshape(-1)
    if w.dtype == "f32":
        return np.ascontiguousarray(flat, np.float32)
    if w.dtype == "f16":
        return flat.astype(np.float32)
    if w.dtype == "bf16":
        return (flat.astype(np.uint32) << 16).view(np.float32)
    raise DllamaError(f"{w.name}: a {w.dtype} vector is not supported (vectors are f32, f16 or bf16)")


@dataclass
class Model:
    """A loaded model file: config, weights by GGUF-style name, and the metadata a tokenizer may need.

    A tied classifier appears as `output.weight` sharing the embedding's Weight object.
    """

    config: ModelConfig
    weights: dict[str, Weight]
    path: str
    file_size: int
    kind: str  # "gguf" or "m"
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def classifier(self) -> Weight:
        return self.weights["output.weight"]

    @property
    def tied(self) -> bool:
        return self.weights["output.weight"] is self.weights["token_embd.weight"]
