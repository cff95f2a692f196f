"""GGUF files: metadata and tensors, memory-mapped; quantized tensors stay in their native blocks.

The header is parsed here (vectorised where it matters) rather than with gguf.GGUFReader, which spends
seconds building one Python object per vocabulary entry; the gguf package supplies the type tables.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from engine.arch import get_arch
from engine.arch.base import Meta, gguf_key_names
from engine.errors import DllamaError
from engine.weight_types import from_ggml
from engine.weights import Model, Weight, map_file, weight_from_bytes

GGUF_MAGIC = b"GGUF"
# Bounds a header must keep before anything is allocated for it (real files: a few MB, a few hundred tensors).
MAX_HEADER = 128 << 20  # bytes of metadata and tensor infos, the vocabulary included
MAX_KV = 1 << 16
MAX_TENSORS = 1 << 20
MAX_ARRAY = 1 << 22  # elements of one metadata array (vocabularies hold ~10^5)
MAX_STRING = 1 << 24
MAX_NESTING = 4  # arrays of arrays
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ALIGNMENT = 1 << 20

_SCALAR = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}
# The fewest bytes a value of each type takes: a string its length field, an array its type and count.
_MIN_BYTES = {
    **{t: struct.calcsize(f) for t, f in _SCALAR.items()},
    GGUFValueType.STRING: 8,
    GGUFValueType.ARRAY: 12,
}
_U64 = struct.Struct("<Q")
_MIN_KV_BYTES = 8 + 4 + 1  # key length, value type, a one-byte value
_MIN_TENSOR_BYTES = 8 + 4 + 8 + 4 + 8  # name length, ndim, one dimension, type, offset


@dataclass
class GGUFTensorInfo:
    """One tensor's entry in the header; shape is GGUF order (ne0 = contiguous dimension first)."""

    name: str
    shape: tuple[int, ...]
    ggml_type: GGMLQuantizationType
    offset: int  # absolute byte offset in the file

    @property
    def nbytes(self) -> int:
        block, type_size = GGML_QUANT_SIZES[self.ggml_type]
        return math.prod(self.shape) // block * type_size  # Python integers: no overflow


class _Cursor:
    """Reads the header from a mapping of at most MAX_HEADER bytes; every read and count is checked against
    what is left, so a corrupt count fails before anything is allocated or looped over."""

    def __init__(self, buf: np.memmap, path: str, file_size: int):
        self.buf, self.pos, self.path, self.file_size = memoryview(buf), 0, path, file_size

    def fail(self, what: str) -> NoReturn:
        raise DllamaError(f"{self.path}: corrupt GGUF header: {what}")

    def need(self, n: int, what: str) -> None:
        if n > len(self.buf) - self.pos:
            if len(self.buf) < self.file_size:
                self.fail(f"{what} runs past the {MAX_HEADER >> 20} MiB a header may take")
            raise DllamaError(
                f"{self.path}: truncated GGUF header ({what} runs past the end of the file at byte "
                f"{self.file_size})"
            )

    def unpack(self, fmt: str, what: str) -> Any:
        size = struct.calcsize(fmt)
        self.need(size, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def count(self, what: str, bound: int, min_bytes: int) -> int:
        """A count of items each taking at least `min_bytes`: within `bound` and the bytes left."""
        n = self.unpack("<Q", what)
        if n > bound:
            self.fail(f"{what} {n} is over {bound}")
        self.need(n * min_bytes, f"{what} {n}")
        return n

    def string(self, what: str) -> str:
        n = self.unpack("<Q", f"the length of {what}")
        if n > MAX_STRING:
            self.fail(f"{what} of {n} bytes is over {MAX_STRING}")
        self.need(n, what)
        s = bytes(self.buf[self.pos : self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def strings(self, n: int, what: str) -> list[str]:
        """`n` strings in a row (a vocabulary, its merges): `string` inlined, the loop that dominates the
        parse of a real header."""
        buf, pos, end, out = self.buf, self.pos, len(self.buf), []
        length_at = _U64.unpack_from
        for _ in range(n):
            if end - pos < 8:
                break
            (size,) = length_at(buf, pos)
            if size > MAX_STRING or size > end - pos - 8:
                break
            out.append(str(buf[pos + 8 : pos + 8 + size], "utf-8", "replace"))
            pos += 8 + size
        self.pos = pos
        if len(out) < n:
            self.string(what)  # raises, saying why the next one does not fit
        return out

    def name(self, what: str) -> str:
        """A key or tensor name; unprintable characters escaped, so that an error naming it is one line."""
        s = self.string(what)
        return s if s.isprintable() else s.encode("unicode_escape").decode("ascii")

    def value_type(self, key: str) -> GGUFValueType:
        code = self.unpack("<I", f"the type of {key}")
        try:
            return GGUFValueType(code)
        except ValueError:
            pass
        self.fail(f"{key} has unknown value type {code}")

    def value(self, vtype: GGUFValueType, key: str, depth: int = 0) -> Any:
        if vtype == GGUFValueType.STRING:
            return self.string(key)
        if vtype != GGUFValueType.ARRAY:
            return self.unpack(_SCALAR[vtype], key)
        if depth == MAX_NESTING:
            self.fail(f"{key} nests arrays deeper than {MAX_NESTING}")
        etype = self.value_type(key)
        n = self.count(f"the length of array {key}", MAX_ARRAY, _MIN_BYTES[etype])
        if etype in _SCALAR:  # numeric arrays in one go
            dt = np.dtype(_SCALAR[etype].replace("?", "b1"))
            arr = np.frombuffer(self.buf, dtype=dt, count=n, offset=self.pos)
            self.pos += n * dt.itemsize
            return arr.tolist()
        if etype == GGUFValueType.STRING:
            return self.strings(n, key)
        return [self.value(etype, key, depth + 1) for _ in range(n)]


def _alignment(meta: dict[str, Any], path: str) -> int:
    align = meta.get("general.alignment", 32)
    if not (
        isinstance(align, int)
        and not isinstance(align, bool)
        and 1 <= align <= MAX_ALIGNMENT
        and align & (align - 1) == 0
    ):
        raise DllamaError(
            f"{path}: general.alignment {align!r} must be a power of two from 1 to {MAX_ALIGNMENT}"
        )
    return align


def _tensor_info(
    path: str,
    name: str,
    shape: tuple[int, ...],
    gtype: int,
    offset: int,
    data_start: int,
    align: int,
    size: int,
) -> GGUFTensorInfo:
    """A tensor's entry checked: a known type, whole blocks per row, aligned and inside the file."""
    try:
        gt = GGMLQuantizationType(gtype)
        block, _ = GGML_QUANT_SIZES[gt]
    except (ValueError, KeyError):
        raise DllamaError(f"{path}: tensor {name} has unknown GGML type {gtype}") from None
    if min(shape) < 1:
        raise DllamaError(f"{path}: tensor {name} has a dimension of 0 (shape {list(shape)})")
    if shape[0] % block:
        raise DllamaError(f"{path}: tensor {name}: rows of {shape[0]} values are not whole {gt.name} blocks")
    if offset % align:
        raise DllamaError(f"{path}: tensor {name} offset {offset} is not a multiple of the alignment {align}")
    info = GGUFTensorInfo(name, shape, gt, data_start + offset)
    if info.offset + info.nbytes > size:
        raise DllamaError(
            f"{path}: truncated file: tensor {name} needs bytes up to {info.offset + info.nbytes}, "
            f"file has {size}"
        )
    return info


def read_gguf(path: str | Path) -> tuple[dict[str, Any], dict[str, GGUFTensorInfo], np.memmap]:
    """Parse a GGUF file: (metadata, tensor infos by name, read-only memory map of the whole file).

    The header is parsed from a mapping of its first MAX_HEADER bytes; duplicate keys or tensor names,
    counts the file cannot hold, overflowing shapes and tensors outside the file are refused."""
    path = str(path)
    head = map_file(path, MAX_HEADER)
    size = os.stat(path).st_size
    if len(head) < 4 or bytes(head[:4]) != GGUF_MAGIC:
        raise DllamaError(f"{path}: not a GGUF file (wrong magic)")
    cur = _Cursor(head, path, size)
    cur.pos = 4
    version = cur.unpack("<I", "the version")
    if version not in (2, 3):
        raise DllamaError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
    n_tensors = cur.unpack("<Q", "the tensor count")
    if n_tensors > MAX_TENSORS:
        cur.fail(f"tensor count {n_tensors} is over {MAX_TENSORS}")
    n_kv = cur.count("the metadata key count", MAX_KV, _MIN_KV_BYTES)
    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.name("a metadata key")
        if key in meta:
            raise DllamaError(f"{path}: GGUF metadata key {key} appears twice")
        meta[key] = cur.value(cur.value_type(key), key)
    cur.need(n_tensors * _MIN_TENSOR_BYTES, f"tensor count {n_tensors}")
    raw: dict[str, tuple[tuple[int, ...], int, int]] = {}
    for _ in range(n_tensors):
        name = cur.name("a tensor name")
        if name in raw:
            raise DllamaError(f"{path}: tensor {name} appears twice in the GGUF header")
        ndim = cur.unpack("<I", f"the dimension count of tensor {name}")
        if not 1 <= ndim <= MAX_DIMS:
            raise DllamaError(f"{path}: tensor {name} has {ndim} dimensions (GGUF allows 1 to {MAX_DIMS})")
        shape = tuple(cur.unpack("<Q", f"the shape of tensor {name}") for _ in range(ndim))
        gtype = cur.unpack("<I", f"the type of tensor {name}")
        raw[name] = (shape, gtype, cur.unpack("<Q", f"the offset of tensor {name}"))
    align = _alignment(meta, path)
    data_start = (cur.pos + align - 1) // align * align
    tensors = {name: _tensor_info(path, name, *r, data_start, align, size) for name, r in raw.items()}
    return meta, tensors, map_file(path)


def _weight(info: GGUFTensorInfo, mm: np.memmap, path: str) -> Weight:
    wt = from_ggml(int(info.ggml_type), f"{path}: tensor {info.name}")
    if not 1 <= len(info.shape) <= 3:
        raise DllamaError(f"{path}: tensor {info.name} has {len(info.shape)} dimensions (expected 1 to 3)")
    shape = tuple(reversed(info.shape))  # GGUF lists the contiguous dimension first
    raw = mm[info.offset : info.offset + info.nbytes]
    return weight_from_bytes(info.name, wt.name, shape, raw)


def load_gguf(path: str | Path) -> Model:
    """Load a GGUF model: config from its architecture's metadata keys, every tensor a view of the
    memory-mapped file (no copies); tensors the architecture does not know are refused."""
    path = str(path)
    meta, infos, mm = read_gguf(path)
    arch = get_arch(meta.get("general.architecture"), path)
    cfg = arch.config(Meta(meta, path, arch.name))
    cfg.validate(path, gguf_key_names(arch.name))
    weights = arch.collect(cfg, lambda name: _weight(infos[name], mm, path) if name in infos else None, path)
    unknown = sorted(set(infos) - set(weights))
    if unknown:
        raise DllamaError(
            f"{path}: tensor {unknown[0]} ({len(unknown)} in all) is not part of the {arch.name} "
            "architecture: this variant is not supported"
        )
    return Model(cfg, weights, path, len(mm), "gguf", meta)
