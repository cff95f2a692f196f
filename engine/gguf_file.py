"""GGUF files: metadata and tensors, memory-mapped; quantized tensors stay in their native blocks.

The header is parsed here (vectorised where it matters) rather than with gguf.GGUFReader, which spends
seconds building one Python object per vocabulary entry; the gguf package supplies the type tables.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from engine.arch import get_arch
from engine.arch.base import Meta
from engine.errors import DllamaError
from engine.weight_types import from_ggml
from engine.weights import Model, Weight, map_file, weight_from_bytes

GGUF_MAGIC = b"GGUF"

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
        return int(np.prod(self.shape)) // block * type_size


class _Cursor:
    def __init__(self, buf: memoryview, path: str):
        self.buf, self.pos, self.path = buf, 0, path

    def unpack(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise DllamaError(f"{self.path}: truncated GGUF header (ends at byte {len(self.buf)})")
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        n = self.unpack("<Q")
        if self.pos + n > len(self.buf):
            raise DllamaError(f"{self.path}: truncated GGUF header (a string runs past the end of the file)")
        s = bytes(self.buf[self.pos : self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vtype: int) -> Any:
        try:
            vtype = GGUFValueType(vtype)
        except ValueError:
            raise DllamaError(f"{self.path}: unknown GGUF value type {vtype} (corrupt header?)") from None
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype == GGUFValueType.ARRAY:
            etype, n = self.unpack("<I"), self.unpack("<Q")
            if etype in _SCALAR:  # numeric arrays in one go
                dt = np.dtype(_SCALAR[GGUFValueType(etype)].replace("?", "b1"))
                end = self.pos + n * dt.itemsize
                if end > len(self.buf):
                    raise DllamaError(f"{self.path}: truncated GGUF header (an array runs past the end)")
                arr = np.frombuffer(self.buf, dtype=dt, count=n, offset=self.pos).copy()
                self.pos = end
                return arr.tolist()
            return [self.value(etype) for _ in range(n)]
        return self.unpack(_SCALAR[vtype])


def read_gguf(path: str | Path) -> tuple[dict[str, Any], dict[str, GGUFTensorInfo], np.memmap]:
    """Parse a GGUF file: (metadata, tensor infos by name, read-only memory map of the whole file)."""
    path = str(path)
    mm = map_file(path)
    if len(mm) < 4 or bytes(mm[:4]) != GGUF_MAGIC:
        raise DllamaError(f"{path}: not a GGUF file (wrong magic)")
    cur = _Cursor(memoryview(mm), path)
    cur.pos = 4
    version = cur.unpack("<I")
    if version not in (2, 3):
        raise DllamaError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
    n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key = cur.string()
        meta[key] = cur.value(cur.unpack("<I"))
    raw: list[tuple[str, tuple[int, ...], int, int]] = []
    for _ in range(n_tensors):
        name = cur.string()
        ndim = cur.unpack("<I")
        shape = tuple(cur.unpack("<Q") for _ in range(ndim))
        raw.append((name, shape, cur.unpack("<I"), cur.unpack("<Q")))
    align = int(meta.get("general.alignment", 32))
    data_start = (cur.pos + align - 1) // align * align
    tensors: dict[str, GGUFTensorInfo] = {}
    for name, shape, gtype, off in raw:
        try:
            gt = GGMLQuantizationType(gtype)
        except ValueError:
            raise DllamaError(f"{path}: tensor {name} has unknown GGML type {gtype}") from None
        info = GGUFTensorInfo(name, shape, gt, data_start + off)
        if gt in GGML_QUANT_SIZES and info.offset + info.nbytes > len(mm):
            raise DllamaError(
                f"{path}: truncated file: tensor {name} needs bytes up to {info.offset + info.nbytes}, "
                f"file has {len(mm)}"
            )
        tensors[name] = info
    return meta, tensors, mm


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
    weights = arch.collect(cfg, lambda name: _weight(infos[name], mm, path) if name in infos else None, path)
    unknown = sorted(set(infos) - set(weights))
    if unknown:
        raise DllamaError(
            f"{path}: tensor {unknown[0]} ({len(unknown)} in all) is not part of the {arch.name} "
            "architecture: this variant is not supported"
        )
    return Model(cfg, weights, path, len(mm), "gguf", meta)
