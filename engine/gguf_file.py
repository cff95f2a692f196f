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

from engine.config import ModelConfig, RopeScaling
from engine.errors import DllamaError
from engine.weights import Model, Weight, map_file, row_bytes

GGUF_MAGIC = b"GGUF"

_SCALAR = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
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


GGML_TO_DTYPE = {
    GGMLQuantizationType.F32: "f32",
    GGMLQuantizationType.F16: "f16",
    GGMLQuantizationType.BF16: "bf16",
    GGMLQuantizationType.Q8_0: "q80",
    GGMLQuantizationType.Q4_0: "q40",
    GGMLQuantizationType.Q4_1: "q41",
}
_NP_DTYPE = {"f32": np.float32, "f16": np.float16, "bf16": np.uint16}
LAYER_TENSORS = (
    "attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down",
)


def _f32(value: float) -> float:
    """A float32 metadata value as the shortest decimal that rounds to it (1e-05, not 9.99999974e-06)."""
    return float(str(np.float32(value)))


def _int_key(meta: dict[str, Any], key: str, path: str, default: int | None = None) -> int:
    value = meta.get(key, default)
    if value is None:
        raise DllamaError(f"{path}: GGUF metadata key {key} is missing")
    if isinstance(value, list) or isinstance(value, bool) or not isinstance(value, int):
        raise DllamaError(f"{path}: GGUF metadata key {key} = {value!r} is not a single integer")
    return value


def gguf_config(meta: dict[str, Any], path: str) -> ModelConfig:
    """ModelConfig from the `llama.*` metadata keys of a GGUF file."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise DllamaError(f"{path}: architecture {arch!r} is not supported (only 'llama' GGUF models are)")
    dim = _int_key(meta, "llama.embedding_length", path)
    n_heads = _int_key(meta, "llama.attention.head_count", path)
    if "llama.attention.key_length" in meta:
        head_dim = _int_key(meta, "llama.attention.key_length", path)
    elif "llama.rope.dimension_count" in meta:
        head_dim = _int_key(meta, "llama.rope.dimension_count", path)
    elif dim % n_heads == 0:
        head_dim = dim // n_heads
    else:
        raise DllamaError(f"{path}: embedding_length {dim} is not a multiple of head_count {n_heads}")
    if "llama.vocab_size" in meta:
        vocab = _int_key(meta, "llama.vocab_size", path)
    elif meta.get("tokenizer.ggml.tokens"):
        vocab = len(meta["tokenizer.ggml.tokens"])
    else:
        raise DllamaError(f"{path}: neither llama.vocab_size nor tokenizer.ggml.tokens gives the vocab size")
    scaling = None
    stype = meta.get("llama.rope.scaling.type")
    if stype == "llama3" and meta.get("llama.rope.scaling.factor", 1.0) != 1.0:
        scaling = RopeScaling(
            factor=_f32(meta.get("llama.rope.scaling.factor", 1.0)),
            low_freq_factor=_f32(meta.get("llama.rope.scaling.low_freq_factor", 1.0)),
            high_freq_factor=_f32(meta.get("llama.rope.scaling.high_freq_factor", 4.0)),
            orig_max_seq_len=_int_key(meta, "llama.rope.scaling.original_context_length", path, 8192),
        )
    elif stype not in (None, "none"):
        raise DllamaError(f"{path}: rope scaling type {stype!r} is not supported (only 'llama3' is)")
    return ModelConfig(
        arch="llama",
        dim=dim,
        hidden_dim=_int_key(meta, "llama.feed_forward_length", path),
        n_layers=_int_key(meta, "llama.block_count", path),
        n_heads=n_heads,
        n_kv_heads=_int_key(meta, "llama.attention.head_count_kv", path, n_heads),
        head_dim=head_dim,
        vocab_size=vocab,
        context_len=_int_key(meta, "llama.context_length", path),
        norm_eps=_f32(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=_f32(meta.get("llama.rope.freq_base", 10000.0)),
        rope_scaling=scaling,
    )


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(rows, cols) of every tensor a Llama model needs, by GGUF name (1-D tensors have rows = 1)."""
    shapes = {"token_embd.weight": (cfg.vocab_size, cfg.dim), "output_norm.weight": (1, cfg.dim)}
    per_layer = {
        "attn_norm": (1, cfg.dim), "attn_q": (cfg.q_dim, cfg.dim), "attn_k": (cfg.kv_dim, cfg.dim),
        "attn_v": (cfg.kv_dim, cfg.dim), "attn_output": (cfg.dim, cfg.q_dim), "ffn_norm": (1, cfg.dim),
        "ffn_gate": (cfg.hidden_dim, cfg.dim), "ffn_up": (cfg.hidden_dim, cfg.dim),
        "ffn_down": (cfg.dim, cfg.hidden_dim),
    }
    for layer in range(cfg.n_layers):
        for t in LAYER_TENSORS:
            shapes[f"blk.{layer}.{t}.weight"] = per_layer[t]
    return shapes


def _weight(info: GGUFTensorInfo, mm: np.memmap, path: str) -> Weight:
    dtype = GGML_TO_DTYPE.get(info.ggml_type)
    if dtype is None:
        raise DllamaError(
            f"{path}: tensor {info.name} has type {info.ggml_type.name}, which is not supported "
            f"(supported: {', '.join(t.name for t in GGML_TO_DTYPE)})"
        )
    if len(info.shape) not in (1, 2):
        raise DllamaError(f"{path}: tensor {info.name} has {len(info.shape)} dimensions (expected 1 or 2)")
    cols = info.shape[0]
    rows = info.shape[1] if len(info.shape) == 2 else 1
    raw = mm[info.offset : info.offset + info.nbytes]
    if dtype in _NP_DTYPE:
        data = raw.view(_NP_DTYPE[dtype]).reshape(rows, cols)
    else:
        data = raw.reshape(rows, row_bytes(dtype, cols))
    return Weight(info.name, dtype, rows, cols, data)


def load_gguf(path: str | Path) -> Model:
    """Load a Llama GGUF: config from metadata, every tensor a view of the memory-mapped file (no copies)."""
    path = str(path)
    meta, infos, mm = read_gguf(path)
    cfg = gguf_config(meta, path)
    shapes = expected_shapes(cfg)
    if "output.weight" in infos:
        shapes["output.weight"] = (cfg.vocab_size, cfg.dim)
    if "rope_freqs.weight" in infos:
        shapes["rope_freqs.weight"] = (1, cfg.head_dim // 2)
    weights: dict[str, Weight] = {}
    for name, (rows, cols) in shapes.items():
        info = infos.get(name)
        if info is None:
            raise DllamaError(f"{path}: required tensor {name} is missing")
        w = _weight(info, mm, path)
        if (w.rows, w.cols) != (rows, cols):
            raise DllamaError(
                f"{path}: tensor {name} is {w.rows}x{w.cols} (rows x cols), the config needs {rows}x{cols}"
            )
        weights[name] = w
    freqs = weights.get("rope_freqs.weight")
    if freqs is not None and freqs.dtype != "f32":
        raise DllamaError(f"{path}: tensor rope_freqs.weight must be F32, not {freqs.dtype}")
    return Model(cfg, weights, path, len(mm), "gguf", meta)
