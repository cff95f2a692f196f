"""distributed-llama `.m` model files (spec 1.1-1.5): a memory-mapping reader and a compatible writer."""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np

from engine.arch import arch_for_m_type, get_arch
from engine.arch.base import as_weight_shape
from engine.atomic_file import atomic_write
from engine.config import ModelConfig, RopeScaling
from engine.errors import DllamaError
from engine.quants import dequantize, quantize
from engine.weight_types import from_m_code, row_bytes, weight_type
from engine.weights import Model, Weight, map_file, weight_from_bytes

M_MAGIC = 0x0A00ABCD
OLD_M_MAGICS = (0xABCD00, 0xABCD01)
ROPE_LLAMA, ROPE_FALCON, ROPE_LLAMA3_1 = 0, 1, 2
HEADER_KEYS = (
    "version",
    "arch_type",
    "dim",
    "hidden_dim",
    "n_layers",
    "n_heads",
    "n_kv_heads",
    "n_experts",
    "n_active_experts",
    "vocab_size",
    "max_seq_len",
    "hidden_act",
    "rope_theta",
    "weights_float_type",
    "rope_scaling_factor",
    "rope_scaling_low_freq_factor",
    "rope_scaling_high_freq_factory",
    "rope_scaling_orig_max_seq_len",
    "rope_type",
    "head_dim",
    "norm_epsilon",
    "moe_hidden_dim",
)
KEY_ID = {name: i for i, name in enumerate(HEADER_KEYS)}
NORM_EPS = {5: 1e-5, 6: 1e-6}
# ModelConfig fields as the .m header spells them (ModelConfig.validate names refused values so).
M_NAMES = {
    "context_len": "max_seq_len",
    "norm_eps": "norm_epsilon",
    "rope_scaling.factor": "rope_scaling_factor",
    "rope_scaling.low_freq_factor": "rope_scaling_low_freq_factor",
    "rope_scaling.high_freq_factor": "rope_scaling_high_freq_factory",
    "rope_scaling.orig_max_seq_len": "rope_scaling_orig_max_seq_len",
}
MAX_HEADER = 8 + 8 * len(HEADER_KEYS)  # every key once
REQUIRED = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "max_seq_len")
_CHUNK_VALUES = 1 << 22  # values converted at a time while writing (bounds the writer's memory)


def stream_plan(cfg: ModelConfig, wtype: str) -> list[list[tuple[str, str, tuple[int, ...]]]]:
    """The `.m` tensor stream: groups of (name, dtype, shape) in file order. A group of several expert
    stacks is stored interleaved, expert by expert (gate_e, down_e, up_e for e = 0, 1, ...)."""
    groups: list[list[tuple[str, str, tuple[int, ...]]]] = []
    for name, spec in get_arch(cfg.arch).table(cfg):
        if spec.m is None:
            continue
        entry = (name, "f32" if spec.m == "f32" else wtype, spec.shape(cfg))
        if len(entry[2]) == 3 and groups and len(groups[-1][-1][2]) == 3:
            groups[-1].append(entry)
        else:
            groups.append([entry])
    return groups


def _matrix_bytes(dtype: str, shape: tuple[int, ...]) -> int:
    """Bytes of one matrix (one expert's, for a stack) of this shape."""
    rows = shape[-2] if len(shape) > 1 else 1
    return rows * row_bytes(dtype, shape[-1])


def _group_bytes(group: list[tuple[str, str, tuple[int, ...]]]) -> int:
    experts = group[0][2][0] if len(group[0][2]) == 3 else 1
    return experts * sum(_matrix_bytes(dtype, shape) for _, dtype, shape in group)


def _plan_bytes(plan: list[list[tuple[str, str, tuple[int, ...]]]]) -> int:
    return sum(_group_bytes(g) for g in plan)


def _header(mm: np.ndarray, path: str) -> tuple[dict[str, int], int]:
    if len(mm) < 8:
        raise DllamaError(f"{path}: truncated .m file ({len(mm)} bytes, the header alone needs at least 8)")
    magic, header_size = struct.unpack_from("<iI", mm, 0)
    if magic in OLD_M_MAGICS:
        raise DllamaError(f"{path}: old model format (magic {magic:#x}), re-convert it")
    if magic != M_MAGIC:
        raise DllamaError(f"{path}: not a distributed-llama .m file (magic {magic & 0xFFFFFFFF:#010x})")
    if not 8 <= header_size <= min(MAX_HEADER, len(mm)) or (header_size - 8) % 8:
        raise DllamaError(
            f"{path}: corrupt .m header (header size {header_size}: a multiple of 8 from 8 to "
            f"{MAX_HEADER}, one pair per key; file size {len(mm)})"
        )
    pairs = np.frombuffer(mm, dtype="<i4", count=(header_size - 8) // 4, offset=8).reshape(-1, 2)
    header: dict[str, int] = {}
    for key, value in pairs.tolist():
        if not 0 <= key < len(HEADER_KEYS):
            raise DllamaError(f"{path}: unsupported .m header key {key}")
        if HEADER_KEYS[key] in header:
            raise DllamaError(f"{path}: .m header key {HEADER_KEYS[key]} appears twice")
        header[HEADER_KEYS[key]] = value
    return header, header_size


def _config(h: dict[str, int], path: str) -> tuple[ModelConfig, str]:
    arch = arch_for_m_type(h.get("arch_type", 0), path)
    if "weights_float_type" not in h:
        raise DllamaError(f"{path}: the .m header does not specify the weight type (key weights_float_type)")
    wtype = from_m_code(h["weights_float_type"], path).name
    moe = h.get("n_experts", 0) > 0
    for key in REQUIRED + (("n_active_experts", "moe_hidden_dim") if moe else ()):
        if h.get(key, 0) <= 0:
            raise DllamaError(f"{path}: the .m header lacks a positive {key}")
    if moe != (arch.name == "qwen3moe") or (moe and h["n_active_experts"] > h["n_experts"]):
        raise DllamaError(
            f"{path}: {h.get('n_experts', 0)} experts ({h.get('n_active_experts', 0)} active) do not fit the "
            f"{arch.name} architecture"
        )
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
        arch=arch.name,
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
        rope_neox=rope_type == ROPE_FALCON or arch.neox,  # distributed-llama forces Falcon RoPE for Qwen3
        rope_scaling=scaling,
        n_experts=h.get("n_experts", 0),
        n_active_experts=h.get("n_active_experts", 0) if moe else 0,
        moe_hidden_dim=h.get("moe_hidden_dim", 0) if moe else 0,
    )
    return cfg, wtype


def read_m(path: str | Path) -> Model:
    """Load a distributed-llama `.m` file; tensors are views of its memory map under GGUF-style names."""
    path = str(path)
    mm = map_file(path)
    header, offset = _header(mm, path)
    cfg, wtype = _config(header, path)
    cfg.validate(path, M_NAMES)
    # Sizes from the plans of one and two layers (every layer is alike), so that the whole plan is only
    # built once the file is known to hold it.
    one, two = (stream_plan(dataclasses.replace(cfg, n_layers=n), wtype) for n in (1, 2))
    for group in one:
        for name, dtype, shape in group:
            if shape[-1] % weight_type(dtype).block_values:
                raise DllamaError(f"{path}: tensor {name}: {shape[-1]} columns is not whole {dtype} blocks")
    first, per_layer = _plan_bytes(one), _plan_bytes(two) - _plan_bytes(one)
    expected = offset + first + (cfg.n_layers - 1) * per_layer
    if expected != len(mm):
        raise DllamaError(
            f"{path}: wrong file size: the header and tensors need {expected} bytes, the file has {len(mm)}"
            + (" (truncated)" if len(mm) < expected else " (extra bytes at the end)")
        )
    plan = stream_plan(cfg, wtype)
    weights: dict[str, Weight] = {}
    for group in plan:
        size = _group_bytes(group)
        if len(group[0][2]) == 3:  # expert stacks, interleaved: a strided view per stack
            experts = group[0][2][0]
            block = mm[offset : offset + size].reshape(experts, size // experts)
            inner = 0
            for name, dtype, shape in group:
                n = _matrix_bytes(dtype, shape)
                weights[name] = weight_from_bytes(name, dtype, shape, block[:, inner : inner + n])
                inner += n
        else:
            ((name, dtype, shape),) = group
            weights[name] = weight_from_bytes(name, dtype, shape, mm[offset : offset + size])
        offset += size
    found = get_arch(cfg.arch).collect(cfg, weights.get, path)
    return Model(cfg, found, path, len(mm), "m", {"header": header})


def _header_pairs(cfg: ModelConfig, wtype: str) -> list[tuple[str, int]]:
    """Header pairs in the order of the Python converter (spec 1.5); floats truncated to int as it does."""
    eps_code = next((c for c, e in NORM_EPS.items() if abs(cfg.norm_eps - e) <= 1e-3 * e), None)
    if eps_code is None:
        raise DllamaError(f"norm epsilon {cfg.norm_eps} cannot be stored in a .m file (only 1e-5 and 1e-6)")
    pairs = [
        ("version", 0),
        ("arch_type", get_arch(cfg.arch).m_arch_type),
        ("hidden_act", 1),
        ("dim", cfg.dim),
        ("hidden_dim", cfg.hidden_dim),
        ("n_layers", cfg.n_layers),
        ("n_heads", cfg.n_heads),
        ("n_kv_heads", cfg.n_kv_heads),
        ("weights_float_type", weight_type(wtype).m_code),
        ("max_seq_len", cfg.context_len),
        ("vocab_size", cfg.vocab_size),
        ("n_experts", cfg.n_experts),
        ("n_active_experts", cfg.n_active_experts),
        ("rope_theta", int(cfg.rope_theta)),
    ]
    rs = cfg.rope_scaling
    if rs is not None:
        pairs += [
            ("rope_scaling_factor", int(rs.factor)),
            ("rope_scaling_low_freq_factor", int(rs.low_freq_factor)),
            ("rope_scaling_high_freq_factory", int(rs.high_freq_factor)),
            ("rope_scaling_orig_max_seq_len", int(rs.orig_max_seq_len)),
            ("rope_type", ROPE_LLAMA3_1),
        ]
    elif cfg.rope_neox and not get_arch(cfg.arch).neox:
        pairs.append(("rope_type", ROPE_FALCON))
    pairs += [("head_dim", cfg.head_dim), ("norm_epsilon", eps_code)]
    if cfg.n_experts:
        pairs.append(("moe_hidden_dim", cfg.moe_hidden_dim))
    return pairs


def _write_matrix(
    f: BinaryIO, data: np.ndarray, src: str, dtype: str, cols: int, order: np.ndarray | None
) -> None:
    """Write a (rows, ...) matrix stored as `src` as `dtype`, rows permuted by `order`: same encoding ->
    bytes copied, else re-encoded a chunk of rows at a time."""
    rows = data.shape[0]
    step = max(1, _CHUNK_VALUES // cols)
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        chunk = data[start:stop] if order is None else data[order[start:stop]]
        if src == dtype:
            f.write(np.ascontiguousarray(chunk).tobytes())
        else:
            f.write(quantize(dequantize(chunk, src, stop - start, cols), dtype).tobytes())


def check_writable(model: Model) -> None:
    """Refuse a model that a `.m` file cannot hold (an architecture or a tensor distributed-llama lacks)."""
    cfg = model.config
    arch = get_arch(cfg.arch)
    if arch.m_arch_type is None:
        raise DllamaError(f"{model.path}: distributed-llama's .m format has no {cfg.arch} architecture")
    lost = [n for n, s in arch.table(cfg) if s.m is None and not s.optional and n in model.weights]
    if lost:
        raise DllamaError(f"{model.path}: a .m file cannot hold tensor {lost[0]} ({cfg.arch} architecture)")


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
    wt = weight_type(wtype)
    if wt.m_code is None:
        raise DllamaError(f"weight type {wtype!r} cannot be written to a .m file (use f32, f16, q40 or q80)")
    check_writable(model)
    cfg = model.config
    order = None
    if vocab_order is not None:
        order = np.asarray(vocab_order, dtype=np.int64)
        if order.shape != (cfg.vocab_size,) or not np.array_equal(np.sort(order), np.arange(cfg.vocab_size)):
            raise DllamaError(f"vocab order is not a permutation of the {cfg.vocab_size} token ids")
    pairs = _header_pairs(cfg, wtype)
    plan = stream_plan(cfg, wtype)
    for group in plan:
        for name, dtype, shape in group:
            w = model.weights.get(name)
            if w is None:
                raise DllamaError(f"{model.path}: tensor {name} is missing")
            if w.shape != as_weight_shape(shape):
                raise DllamaError(f"{model.path}: tensor {name} is {w.shape}, expected {shape}")
            if shape[-1] % weight_type(dtype).block_values:
                raise DllamaError(f"tensor {name}: {shape[-1]} columns is not whole {dtype} blocks")
    with atomic_write(path) as f:
        f.write(struct.pack("<iI", M_MAGIC, 8 + 8 * len(pairs)))
        f.write(np.array([(KEY_ID[k], v) for k, v in pairs], dtype="<i4").tobytes())
        for group in plan:
            if len(group[0][2]) == 3:
                for e in range(group[0][2][0]):
                    for name, dtype, _ in group:
                        w = model.weights[name]
                        _write_matrix(f, w.data[e], w.dtype, dtype, w.cols, None)
            else:
                ((name, dtype, _),) = group
                w = model.weights[name]
                reorder = order if name in ("token_embd.weight", "output.weight") else None
                _write_matrix(f, w.data, w.dtype, dtype, w.cols, reorder)
            if log is not None and name.endswith("ffn_norm.weight"):
                log(f"wrote layer {int(name.split('.')[1]) + 1}/{cfg.n_layers}")
