"""distributed-llama `.m` model files (spec 1.1-1.5): a memory-mapping reader and a compatible writer."""

from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np

from engine.atomic_file import atomic_write
from engine.config import ModelConfig, RopeScaling
from engine.errors import DllamaError
from engine.quants import dequantize, quantize
from engine.weights import BLOCK, Model, Weight, map_file, row_bytes

M_MAGIC = 0x0A00ABCD
OLD_M_MAGICS = (0xABCD00, 0xABCD01)
ARCH_LLAMA, ARCH_QWEN3, ARCH_QWEN3_MOE = 0xABCD00, 0xABCD01, 0xABCD02
ROPE_LLAMA, ROPE_FALCON, ROPE_LLAMA3_1 = 0, 1, 2
HEADER_KEYS = (
    "version", "arch_type", "dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "n_experts",
    "n_active_experts", "vocab_size", "max_seq_len", "hidden_act", "rope_theta", "weights_float_type",
    "rope_scaling_factor", "rope_scaling_low_freq_factor", "rope_scaling_high_freq_factory",
    "rope_scaling_orig_max_seq_len", "rope_type", "head_dim", "norm_epsilon", "moe_hidden_dim",
)
KEY_ID = {name: i for i, name in enumerate(HEADER_KEYS)}
FLOAT_TYPES = {0: "f32", 1: "f16", 2: "q40", 3: "q80"}
FLOAT_CODES = {v: k for k, v in FLOAT_TYPES.items()}
NORM_EPS = {5: 1e-5, 6: 1e-6}
REQUIRED = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "max_seq_len")
# .m stream order of the per-layer tensors, by the GGUF-style names used in engine.weights.
LAYER_STREAM = (
    ("attn_q", "wt"), ("attn_k", "wt"), ("attn_v", "wt"), ("attn_output", "wt"),
    ("ffn_gate", "wt"), ("ffn_down", "wt"), ("ffn_up", "wt"), ("attn_norm", "f32"), ("ffn_norm", "f32"),
)
_NP = {"f32": np.float32, "f16": np.float16}
_CHUNK_VALUES = 1 << 22  # values converted at a time while writing (bounds the writer's memory)


def stream_plan(cfg: ModelConfig) -> list[tuple[str, str, int, int]]:
    """(name, dtype or "wt", rows, cols) of every tensor in .m stream order."""
    d, q, kv, h, v = cfg.dim, cfg.q_dim, cfg.kv_dim, cfg.hidden_dim, cfg.vocab_size
    shape = {
        "attn_q": (q, d), "attn_k": (kv, d), "attn_v": (kv, d), "attn_output": (d, q), "ffn_gate": (h, d),
        "ffn_down": (d, h), "ffn_up": (h, d), "attn_norm": (1, d), "ffn_norm": (1, d),
    }
    plan = [("token_embd.weight", "f32", v, d)]
    for layer in range(cfg.n_layers):
        plan += [(f"blk.{layer}.{t}.weight", kind, *shape[t]) for t, kind in LAYER_STREAM]
    plan += [("output_norm.weight", "f32", 1, d), ("output.weight", "wt", v, d)]
    return plan


def _header(mm: np.ndarray, path: str) -> tuple[dict[str, int], int]:
    if len(mm) < 8:
        raise DllamaError(f"{path}: truncated .m file ({len(mm)} bytes, the header alone needs at least 8)")
    magic, header_size = struct.unpack_from("<iI", mm, 0)
    if magic in OLD_M_MAGICS:
        raise DllamaError(f"{path}: old model format (magic {magic:#x}), re-convert it")
    if magic != M_MAGIC:
        raise DllamaError(f"{path}: not a distributed-llama .m file (magic {magic & 0xFFFFFFFF:#010x})")
    if header_size < 8 or (header_size - 8) % 8 or header_size > len(mm):
        raise DllamaError(f"{path}: corrupt .m header (header size {header_size}, file size {len(mm)})")
    pairs = np.frombuffer(mm, dtype="<i4", count=(header_size - 8) // 4, offset=8).reshape(-1, 2)
    header: dict[str, int] = {}
    for key, value in pairs.tolist():
        if not 0 <= key < len(HEADER_KEYS):
            raise DllamaError(f"{path}: unsupported .m header key {key}")
        header[HEADER_KEYS[key]] = value
    return header, header_size


def _config(h: dict[str, int], path: str) -> tuple[ModelConfig, str]:
    arch = h.get("arch_type", 0)
    if arch in (ARCH_QWEN3, ARCH_QWEN3_MOE):
        name = "Qwen3" if arch == ARCH_QWEN3 else "Qwen3-MoE"
        raise DllamaError(f"{path}: {name} .m models are not supported (only the Llama architecture is)")
    if arch != ARCH_LLAMA:
        raise DllamaError(f"{path}: unknown architecture {arch:#x} in the .m header (only Llama is)")
    if h.get("n_experts", 0) != 0:
        raise DllamaError(f"{path}: mixture-of-experts .m models are not supported")
    if "weights_float_type" not in h:
        raise DllamaError(f"{path}: the .m header does not specify the weight type (key weights_float_type)")
    wtype = FLOAT_TYPES.get(h["weights_float_type"])
    if wtype is None:
        raise DllamaError(f"{path}: unsupported weights_float_type {h['weights_float_type']} in the header")
    for key in REQUIRED:
        if h.get(key, 0) <= 0:
            raise DllamaError(f"{path}: the .m header lacks a positive {key}")
    eps = NORM_EPS.get(h.get("norm_epsilon", 5))
    if eps is None:
        raise DllamaError(f"{path}: unsupported norm_epsilon code {h['norm_epsilon']} (5 = 1e-5, 6 = 1e-6)")
    rope_type = h.get("rope_type", ROPE_LLAMA)
    if rope_type not in (ROPE_LLAMA, ROPE_FALCON, ROPE_LLAMA3_1):
        raise DllamaError(f"{path}: unsupported rope_type {rope_type} in the .m header")
    factor = h.get("rope_scaling_factor", 1)
    scaling = None
    if factor != 1:
        scaling = RopeScaling(
            float(factor),
            float(h.get("rope_scaling_low_freq_factor", 0)),
            float(h.get("rope_scaling_high_freq_factory", 0)),
            h.get("rope_scaling_orig_max_seq_len", 0),
        )
    cfg = ModelConfig(
        arch="llama",
        dim=h["dim"],
        hidden_dim=h["hidden_dim"],
        n_layers=h["n_layers"],
        n_heads=h["n_heads"],
        n_kv_heads=h["n_kv_heads"],
        head_dim=h.get("head_dim", h["dim"] // h["n_heads"]),
        vocab_size=h["vocab_size"],
        context_len=h["max_seq_len"],
        norm_eps=eps,
        rope_theta=float(h.get("rope_theta", 10000)),
        rope_neox=rope_type == ROPE_FALCON,
        rope_scaling=scaling,
    )
    return cfg, wtype


def read_m(path: str | Path) -> Model:
    """Load a distributed-llama `.m` file; tensors are views of its memory map under GGUF-style names."""
    path = str(path)
    mm = map_file(path)
    header, offset = _header(mm, path)
    cfg, wtype = _config(header, path)
    plan = [(n, wtype if kind == "wt" else kind, r, c) for n, kind, r, c in stream_plan(cfg)]
    for name, dtype, _, cols in plan:
        if dtype in ("q40", "q80") and cols % BLOCK:
            raise DllamaError(f"{path}: tensor {name}: {cols} columns is not a multiple of {BLOCK} ({dtype})")
    expected = offset + sum(rows * row_bytes(dtype, cols) for _, dtype, rows, cols in plan)
    if expected != len(mm):
        raise DllamaError(
            f"{path}: wrong file size: the header and tensors need {expected} bytes, the file has {len(mm)}"
            + (" (truncated)" if len(mm) < expected else " (extra bytes at the end)")
        )
    weights: dict[str, Weight] = {}
    for name, dtype, rows, cols in plan:
        nbytes = rows * row_bytes(dtype, cols)
        raw = mm[offset : offset + nbytes]
        data = raw.view(_NP[dtype]).reshape(rows, cols) if dtype in _NP else raw.reshape(rows, -1)
        weights[name] = Weight(name, dtype, rows, cols, data)
        offset += nbytes
    return Model(cfg, weights, path, len(mm), "m", {"header": header})


def _header_pairs(cfg: ModelConfig, wtype: str) -> list[tuple[str, int]]:
    """Header pairs in the order of the Python converter (spec 1.5); floats truncated to int as it does."""
    eps_code = next((c for c, e in NORM_EPS.items() if abs(cfg.norm_eps - e) <= 1e-3 * e), None)
    if eps_code is None:
        raise DllamaError(f"norm epsilon {cfg.norm_eps} cannot be stored in a .m file (only 1e-5 and 1e-6)")
    pairs = [
        ("version", 0), ("arch_type", ARCH_LLAMA), ("hidden_act", 1), ("dim", cfg.dim),
        ("hidden_dim", cfg.hidden_dim), ("n_layers", cfg.n_layers), ("n_heads", cfg.n_heads),
        ("n_kv_heads", cfg.n_kv_heads), ("weights_float_type", FLOAT_CODES[wtype]),
        ("max_seq_len", cfg.context_len), ("vocab_size", cfg.vocab_size), ("n_experts", 0),
        ("n_active_experts", 0), ("rope_theta", int(cfg.rope_theta)),
    ]
    rs = cfg.rope_scaling
    if rs is not None:
        pairs += [
            ("rope_scaling_factor", int(rs.factor)),
            ("rope_scaling_low_freq_factor", int(rs.low_freq_factor)),
            ("rope_scaling_high_freq_factory", int(rs.high_freq_factor)),
            ("rope_scaling_orig_max_seq_len", int(rs.orig_max_seq_len)), ("rope_type", ROPE_LLAMA3_1),
        ]
    elif cfg.rope_neox:
        pairs.append(("rope_type", ROPE_FALCON))
    pairs += [("head_dim", cfg.head_dim), ("norm_epsilon", eps_code)]
    return pairs


def _write_tensor(f: BinaryIO, w: Weight, dtype: str, order: np.ndarray | None) -> None:
    """Write `w` as `dtype`, rows permuted by `order`: same encoding -> bytes copied, else re-encoded."""
    step = max(1, _CHUNK_VALUES // w.cols)
    for start in range(0, w.rows, step):
        stop = min(start + step, w.rows)
        rows = w.data[start:stop] if order is None else w.data[order[start:stop]]
        if w.dtype == dtype:
            f.write(np.ascontiguousarray(rows).tobytes())
        else:
            values = dequantize(rows, w.dtype, stop - start, w.cols)
            f.write(quantize(values, dtype).tobytes())


def write_m(
    path: str | Path,
    model: Model,
    wtype: str,
    vocab_order: np.ndarray | None = None,
    log: Callable[[str], None] | None = None,
) -> None:
    """Write `model` as a `.m` file with matrices in `wtype` (f32, f16, q40, q80); atomic.

    `vocab_order[new_id] = old_id` permutes the rows of the embedding and the classifier.
    """
    if wtype not in FLOAT_CODES:
        raise DllamaError(f"weight type {wtype!r} cannot be written to a .m file (use f32, f16, q40 or q80)")
    cfg = model.config
    if cfg.arch != "llama":
        raise DllamaError(f"{model.path}: architecture {cfg.arch!r} cannot be written (only llama)")
    order = None
    if vocab_order is not None:
        order = np.asarray(vocab_order, dtype=np.int64)
        if order.shape != (cfg.vocab_size,) or not np.array_equal(np.sort(order), np.arange(cfg.vocab_size)):
            raise DllamaError(f"vocab order is not a permutation of the {cfg.vocab_size} token ids")
    pairs = _header_pairs(cfg, wtype)
    plan = [(n, wtype if kind == "wt" else kind, r, c) for n, kind, r, c in stream_plan(cfg)]
    sources = {name: model.weights.get(name) for name, *_ in plan}
    sources["output.weight"] = model.classifier
    for name, dtype, rows, cols in plan:
        w = sources[name]
        if w is None:
            raise DllamaError(f"{model.path}: tensor {name} is missing")
        if (w.rows, w.cols) != (rows, cols):
            raise DllamaError(f"{model.path}: tensor {name} is {w.rows}x{w.cols}, expected {rows}x{cols}")
        if dtype in ("q40", "q80") and cols % BLOCK:
            raise DllamaError(f"tensor {name}: {cols} columns is not a multiple of {BLOCK} ({dtype})")
    with atomic_write(path) as f:
        f.write(struct.pack("<iI", M_MAGIC, 8 + 8 * len(pairs)))
        f.write(np.array([(KEY_ID[k], v) for k, v in pairs], dtype="<i4").tobytes())
        for name, dtype, *_ in plan:
            reorder = order if name in ("token_embd.weight", "output.weight") else None
            _write_tensor(f, sources[name], dtype, reorder)
            if log is not None and name.endswith("ffn_norm.weight"):
                log(f"wrote layer {int(name.split('.')[1]) + 1}/{cfg.n_layers}")
