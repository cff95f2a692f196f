"""Weights as the shaders read them: packed uint32 arrays, same-role weights of many layers in one buffer.

Quantised blocks whose size is not a multiple of 16 bytes are split at upload into aligned arrays of the same
total size, one device buffer per field (`FIELDS`): the quantised values (whole uvec4 per block, the shaders
load them as such), one word per block of other 4-byte fields (Q4_1's d and m, Q5's 32 high bits) and lone
fp16 scales packed two per word with each row padded to a whole word. K-quant super-blocks of 144 and 176
bytes (Q4_K, Q5_K) are already aligned and go up as they are; Q6_K's 210-byte ones lose their trailing fp16
d to a scale array. f32/f16/bf16 rows go up as they are. Packing happens a row range at a time straight into
the staging buffer, so the host never holds a second copy of a tensor.

The same role (attn_q, ffn_norm, ...) of consecutive layers shares one device buffer per part, so one shader
pipeline serves every layer (the layer index is a push constant): a few dozen pipelines instead of hundreds.
An expert stack (mixture-of-experts FFN) is one weight of experts x rows rows, expert after expert. A weight
too large for one buffer (the device's binding limit) is cut into row pieces, each its own weight in the
chunks and its own dispatch.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from engine.errors import DllamaError
from engine.weight_types import weight_type
from engine.weights import BLOCK, Weight, vector_f32

# Byte ranges of a block that become one device buffer each, in binding order (see wt_<type>.glsl).
FIELDS: dict[str, tuple[tuple[int, int], ...]] = {
    "q40": ((2, 18), (0, 2)),  # 16 nibble bytes; d
    "q41": ((4, 20), (0, 4)),  # 16 nibble bytes; d and m
    "q50": ((6, 22), (0, 2), (2, 6)),  # 16 nibble bytes; d; 32 high bits
    "q51": ((8, 24), (0, 4), (4, 8)),  # 16 nibble bytes; d and m; 32 high bits
    "q80": ((2, 34), (0, 2)),  # 32 int8; d
    "q4k": ((0, 144),),  # the whole super-block
    "q5k": ((0, 176),),  # the whole super-block
    "q6k": ((0, 208), (208, 210)),  # ql, qh, scales; d
}


@dataclass(frozen=True)
class Part:
    """One device buffer of a weight: `rows` rows of `row_words` words, produced a row range at a time."""

    rows: int
    row_words: int
    pack: Callable[[int, int], np.ndarray]  # (r0, r1) -> uint32 array of (r1 - r0) * row_words words

    @property
    def words(self) -> int:
        return self.rows * self.row_words


def _words(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.uint32).reshape(-1)


def row_arrays(w: Weight) -> list[np.ndarray]:
    """The weight's data as 2-D arrays of contiguous rows: one per expert of a stack, else the whole."""
    return [w.data[e] for e in range(w.experts)] if w.experts else [w.data]


def _rows(w: Weight, r0: int, r1: int) -> list[np.ndarray]:
    """Rows r0..r1 of the weight, counting an expert stack's rows expert after expert."""
    if not w.experts:
        return [w.data[r0:r1]]
    first, last = r0 // w.rows, -(-r1 // w.rows)
    return [w.data[e, max(r0 - e * w.rows, 0) : min(r1 - e * w.rows, w.rows)] for e in range(first, last)]


def _part(w: Weight, row_words: int, words_of: Callable[[np.ndarray], np.ndarray]) -> Part:
    """A part whose rows are `words_of(rows of the weight's data)`."""

    def pack(r0: int, r1: int) -> np.ndarray:
        return np.concatenate([words_of(a) for a in _rows(w, r0, r1)])

    return Part(max(w.experts, 1) * w.rows, row_words, pack)


def _field_part(w: Weight, lo: int, hi: int) -> Part:
    """Bytes lo..hi of every block: whole words per block, or a lone fp16 two per word (rows padded)."""
    wt = weight_type(w.dtype)
    nb = w.cols // wt.block_values

    def blocks(a: np.ndarray) -> np.ndarray:
        return a.reshape(a.shape[0], nb, wt.block_bytes)[:, :, lo:hi]

    if hi - lo == 2:
        half_words = (nb + 1) // 2

        def halves(a: np.ndarray) -> np.ndarray:
            d = np.zeros((a.shape[0], 2 * half_words), np.uint16)
            d[:, :nb] = blocks(a).copy().view(np.uint16).reshape(a.shape[0], nb)
            return _words(d)

        return _part(w, half_words, halves)
    return _part(w, nb * (hi - lo) // 4, lambda a: _words(blocks(a)))


def matrix_parts(w: Weight) -> list[Part]:
    """The device buffers of a matrix or expert stack (matmul/embedding bindings 2, 3, ... in order)."""
    wt = weight_type(w.dtype)
    unit = max(BLOCK, wt.block_values)
    if w.cols % unit:
        raise DllamaError(
            f"{w.name}: the Vulkan backend needs {wt.ggml_name} rows of a multiple of {unit} values "
            f"(this one has {w.cols})"
        )
    if not wt.quantized:
        return [_part(w, w.cols * wt.block_bytes // 4, _words)]
    if w.dtype not in FIELDS:
        raise DllamaError(f"{w.name}: weight type {w.dtype} is not supported by the Vulkan backend")
    return [_field_part(w, lo, hi) for lo, hi in FIELDS[w.dtype]]


def array_part(a: np.ndarray) -> Part:
    """A host array (norm weights, RoPE tables) as a part with one row per entry of its first axis."""
    words = _words(a)
    rows = a.shape[0] if a.ndim > 1 else 1
    row_words = words.size // rows
    return Part(rows, row_words, lambda r0, r1: words[r0 * row_words : r1 * row_words])


def is_vector(w: Weight) -> bool:
    """A 1-D weight (norm scales, biases): uploaded as float32, never cut into pieces."""
    return w.rows == 1 and not w.experts


def weight_parts(w: Weight) -> list[Part]:
    """The device parts of a whole weight: vectors as float32, matrices as matrix_parts."""
    return [array_part(vector_f32(w))] if is_vector(w) else matrix_parts(w)


@dataclass
class WeightChunk:
    """Weights (or the same row piece of weights) of one role, type and shape from consecutive layers, back
    to back in each part buffer. `vector`: they are vectors (a one-row piece of a matrix is not)."""

    weights: list[Weight] = field(default_factory=list)
    vector: bool = False

    def parts(self, w: Weight) -> list[Part]:
        """The device parts of one of the chunk's weights."""
        return [array_part(vector_f32(w))] if self.vector else matrix_parts(w)

    @property
    def part_words(self) -> list[int]:
        """Words of each part buffer of the chunk."""
        return [p.words * len(self.weights) for p in self.parts(self.weights[0])]


@dataclass(frozen=True)
class Piece:
    """Rows row0 .. row0 + rows of a weight (of every expert of a stack), uploaded as weight `index` of
    chunk `chunk`."""

    chunk: int
    index: int
    row0: int
    rows: int


def row_pieces(w: Weight, limit: int) -> list[tuple[int, Weight]]:
    """The weight as (first row, view) row ranges whose every part fits in `limit` bytes: one range when the
    whole weight fits (a large vocabulary's table does not on devices that bind at most 128 MiB)."""
    row_bytes = max(p.row_words for p in weight_parts(w)) * 4 * max(w.experts, 1)
    step = max(1, limit // row_bytes)
    if step >= w.rows:
        return [(0, w)]
    views = []
    for r0 in range(0, w.rows, step):
        r1 = min(w.rows, r0 + step)
        data = w.data[:, r0:r1] if w.experts else w.data[r0:r1]
        views.append((r0, Weight(w.name, w.dtype, r1 - r0, w.cols, data, w.experts)))
    return views


def _role(name: str) -> str:
    return re.sub(r"^blk\.\d+\.", "blk.*.", name)


def _layer(name: str) -> int:
    m = re.match(r"^blk\.(\d+)\.", name)
    return int(m.group(1)) if m else -1


def _identity(w: Weight) -> tuple:
    return (w.dtype, w.data.__array_interface__["data"][0], w.data.shape, w.data.strides)


def group_weights(weights: dict[str, Weight], limit: int) -> tuple[list[WeightChunk], dict[str, list[Piece]]]:
    """Chunks of same-role weights (each part buffer at most `limit` bytes) and, for every name, its pieces
    (row ranges of a weight too large for one buffer, else the whole). The same piece of a role's weights
    in consecutive layers shares a chunk; names whose data is the same array (a tied classifier) share
    their pieces."""
    first: dict[tuple, str] = {}  # data identity -> the name uploaded for it
    groups: dict[tuple, list[tuple[str, int, Weight]]] = {}  # (role, piece, shape) -> (name, row0, view)
    for name in sorted(weights, key=lambda n: (_role(n), _layer(n))):
        w = weights[name]
        if _identity(w) not in first:
            first[_identity(w)] = name
            for k, (r0, view) in enumerate(row_pieces(w, limit)):
                key = (_role(name), k, w.dtype, w.experts, view.rows, w.cols)
                groups.setdefault(key, []).append((name, r0, view))
    chunks: list[WeightChunk] = []
    pieces: dict[str, list[Piece]] = {}
    for members in groups.values():
        vector = is_vector(weights[members[0][0]])
        per = 4 * max(WeightChunk([members[0][2]], vector).part_words)
        step = max(1, limit // max(per, 1))
        for i in range(0, len(members), step):
            chunks.append(WeightChunk([view for _, _, view in members[i : i + step]], vector))
            for k, (name, r0, view) in enumerate(members[i : i + step]):
                pieces.setdefault(name, []).append(Piece(len(chunks) - 1, k, r0, view.rows))
    for name, w in weights.items():
        pieces[name] = pieces[first[_identity(w)]]
    return chunks, pieces
