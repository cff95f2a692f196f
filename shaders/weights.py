"""Weights as the shaders read them: packed uint32 arrays, same-role weights of many layers in one buffer.

Q4_0/Q4_1/Q8_0 blocks (18/20/34 bytes) are not 4-byte aligned, so at upload each block is split into its
quantised values (16 or 32 bytes, word aligned; the shaders load them as uvec4) and its fp16 scale(s): Q4_1's
d and m fill one word per block, Q4_0's and Q8_0's lone d are packed two per word with each row padded to a
whole word. The total size is that of the blocks. f32/f16/bf16 rows are uploaded as they are. Packing happens
a row range at a time straight into the staging buffer, so the host never holds a second copy of a tensor.

The same role (attn_q, ffn_norm, ...) of consecutive layers shares one device buffer per part, so one shader
pipeline serves every layer (the layer index is a push constant): a few dozen pipelines instead of hundreds.
"""

from __future__ import annotations

import mmap
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from engine.errors import DllamaError
from engine.weights import BLOCK, BLOCK_BYTES, Weight


@dataclass(frozen=True)
class Part:
    """One device buffer of a weight: `rows` rows of `row_words` words, produced a row range at a time."""

    rows: int
    row_words: int
    pack: Callable[[int, int], np.ndarray]  # (r0, r1) -> uint32 array of (r1 - r0) * row_words words

    @property
    def words(self) -> int:
        return self.rows * self.row_words


def _blocks(w: Weight) -> np.ndarray:
    return w.data.reshape(w.rows, w.cols // BLOCK, BLOCK_BYTES[w.dtype])


def _words(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.uint32).reshape(-1)


def _scales_two_per_word(w: Weight) -> Part:
    """The fp16 scale d of every block (first 2 bytes), two per word, each row padded to a whole word."""
    nb = w.cols // BLOCK
    half_words = (nb + 1) // 2

    def pack(r0: int, r1: int) -> np.ndarray:
        d = np.zeros((r1 - r0, 2 * half_words), np.uint16)
        d[:, :nb] = _blocks(w)[r0:r1, :, 0:2].copy().view(np.uint16).reshape(r1 - r0, nb)
        return _words(d)

    return Part(w.rows, half_words, pack)


def matrix_parts(w: Weight) -> list[Part]:
    """The device buffers of a matrix used by matmul/embedding shaders (binding 2, and 3 for quantised)."""
    if w.cols % BLOCK:
        raise DllamaError(
            f"{w.name}: the Vulkan backend needs rows of a multiple of {BLOCK} values (this one has {w.cols})"
        )
    nb = w.cols // BLOCK
    if w.dtype in ("f32", "f16", "bf16"):
        row_words = w.cols if w.dtype == "f32" else w.cols // 2
        return [Part(w.rows, row_words, lambda r0, r1: _words(w.data[r0:r1]))]
    if w.dtype == "q40":
        return [
            Part(w.rows, nb * 4, lambda r0, r1: _words(_blocks(w)[r0:r1, :, 2:18])),
            _scales_two_per_word(w),
        ]
    if w.dtype == "q41":
        return [
            Part(w.rows, nb * 4, lambda r0, r1: _words(_blocks(w)[r0:r1, :, 4:20])),
            Part(w.rows, nb, lambda r0, r1: _words(_blocks(w)[r0:r1, :, 0:4])),
        ]
    if w.dtype == "q80":
        return [
            Part(w.rows, nb * 8, lambda r0, r1: _words(_blocks(w)[r0:r1, :, 2:34])),
            _scales_two_per_word(w),
        ]
    raise DllamaError(f"{w.name}: weight type {w.dtype} is not supported by the Vulkan backend")


def vector_f32(w: Weight) -> np.ndarray:
    """A 1-D weight (norm scales) as float32, whatever its stored type."""
    if w.dtype == "bf16":
        return (w.data.reshape(-1).astype(np.uint32) << 16).view(np.float32)
    if w.dtype not in ("f32", "f16"):
        raise DllamaError(
            f"{w.name}: a {w.dtype} vector is not supported (norm weights are f32, f16 or bf16)"
        )
    return np.ascontiguousarray(w.data.reshape(-1), np.float32)


def array_part(a: np.ndarray) -> Part:
    """A host array (norm weights, RoPE tables) as a part with one row per entry of its first axis."""
    words = _words(a)
    rows = a.shape[0] if a.ndim > 1 else 1
    row_words = words.size // rows
    return Part(rows, row_words, lambda r0, r1: words[r0 * row_words : r1 * row_words])


def release_file_pages(a: np.ndarray) -> None:
    """Drop this process's resident pages of a read-only memory-mapped file region once it is on the device.

    The mapping stays valid: pages are read back from the page cache if anything touches them again. Arrays
    that are not views of a file mapping are left alone.
    """
    base = a
    while base is not None and getattr(base, "_mmap", None) is None:
        base = base.base if isinstance(base, np.ndarray) else None
    if base is None or a.nbytes == 0 or not a.flags.c_contiguous:
        return
    mm = base._mmap
    start = np.frombuffer(mm, np.uint8, count=1).__array_interface__["data"][0]
    lo = a.__array_interface__["data"][0] - start
    hi = lo + a.nbytes
    lo -= lo % mmap.PAGESIZE
    if 0 <= lo and hi <= len(mm):
        mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


def weight_parts(w: Weight) -> list[Part]:
    """The device parts of any weight: norm vectors as float32, matrices as matrix_parts."""
    return [array_part(vector_f32(w))] if w.rows == 1 else matrix_parts(w)


@dataclass
class WeightChunk:
    """Weights of one role, type and shape from consecutive layers, back to back in each part buffer."""

    weights: list[Weight] = field(default_factory=list)

    @property
    def part_words(self) -> list[int]:
        """Words of each part buffer of the chunk."""
        return [p.words * len(self.weights) for p in weight_parts(self.weights[0])]


def _role(name: str) -> str:
    return re.sub(r"^blk\.\d+\.", "blk.*.", name)


def _layer(name: str) -> int:
    m = re.match(r"^blk\.(\d+)\.", name)
    return int(m.group(1)) if m else -1


def group_weights(
    weights: dict[str, Weight], limit: int
) -> tuple[list[WeightChunk], dict[str, tuple[int, int]]]:
    """Chunks of same-role weights (each part buffer at most `limit` bytes) and, for every name, its
    (chunk, index in chunk). Names whose data is the same array (a tied classifier) share one slot."""
    first: dict[tuple, str] = {}  # data identity -> the name uploaded for it
    groups: dict[tuple, list[str]] = {}
    for name in sorted(weights, key=lambda n: (_role(n), _layer(n))):
        w = weights[name]
        ident = (w.dtype, w.data.__array_interface__["data"][0], w.data.shape)
        if ident not in first:
            first[ident] = name
            groups.setdefault((_role(name), w.dtype, w.rows, w.cols), []).append(name)
    chunks: list[WeightChunk] = []
    slots: dict[str, tuple[int, int]] = {}
    for names in groups.values():
        per = max(p.words * 4 for p in weight_parts(weights[names[0]]))
        step = max(1, limit // max(per, 1))
        for i in range(0, len(names), step):
            chunks.append(WeightChunk([weights[n] for n in names[i : i + step]]))
            for k, n in enumerate(names[i : i + step]):
                slots[n] = (len(chunks) - 1, k)
    for name, w in weights.items():
        slots[name] = slots[first[(w.dtype, w.data.__array_interface__["data"][0], w.data.shape)]]
    return chunks, slots
