"""Tensor-parallel slicing (spec 4.9): which rows/columns of every weight node n of N owns.

Attention is cut by query heads: up to n_kv_heads nodes each keep whole GQA groups; beyond that a node keeps
any run of query heads and computes every KV head they read (a KV head shared by two nodes is computed by
both, so no network step is added). The FFN rows (dense and per expert) and the classifier are cut by output
rows. The split rule of every tensor comes from its architecture's table. Cuts fall on the block boundaries
of the column-sliced weights (256-value super-blocks for K-quants, 32 values otherwise), so slices may be
uneven; any node count up to n_heads works.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from engine.arch import get_arch
from engine.arch.base import TensorSpec
from engine.config import ModelConfig
from engine.errors import DllamaError
from engine.weight_types import row_bytes, weight_type
from engine.weights import BLOCK, Model, Weight

KV_TYPES = {"f32": 4, "f16": 2}  # the KV cache's number formats, in bytes per value


def split(total_units: int, n_nodes: int, node: int) -> tuple[int, int]:
    """Unit range [start, end) of `node` when `total_units` are shared as evenly as possible."""
    base, extra = divmod(total_units, n_nodes)
    start = node * base + min(node, extra)
    return start, start + base + (1 if node < extra else 0)


def shares(total_units: int, weights: Sequence[float]) -> list[tuple[int, int]]:
    """Unit ranges [start, end) in proportion to `weights` (largest remainders), every node at least one unit;
    equal weights give exactly `split`'s ranges."""
    n = len(weights)
    if len(set(weights)) == 1:
        return [split(total_units, n, k) for k in range(n)]
    ideal = [total_units * w / sum(weights) for w in weights]
    counts = [max(1, int(x)) for x in ideal]
    while sum(counts) != total_units:  # hand out (or take back) single units by how far each is from ideal
        more = sum(counts) < total_units
        pick = [k for k in range(n) if more or counts[k] > 1]
        k = max(pick, key=lambda k: (ideal[k] - counts[k]) * (1 if more else -1))
        counts[k] += 1 if more else -1
    out, start = [], 0
    for c in counts:
        out.append((start, start + c))
        start += c
    return out


@dataclass(frozen=True)
class NodeSlice:
    """The part of the model node `node` of `n_nodes` computes; ranges are [start, end) in values."""

    node: int
    n_nodes: int
    kv_heads: tuple[int, int]  # KV heads: every one the query heads read
    q_heads: tuple[int, int]  # query heads
    ffn: tuple[int, int]  # dense FFN rows
    moe: tuple[int, int]  # rows of every expert's FFN
    vocab: tuple[int, int]  # classifier rows

    @property
    def n_heads(self) -> int:
        return self.q_heads[1] - self.q_heads[0]

    @property
    def n_kv_heads(self) -> int:
        return self.kv_heads[1] - self.kv_heads[0]

    def q_offset(self, group: int) -> int:
        """Local query head h reads local KV head (q_offset + h) // group (`group`: the model's GQA size)."""
        return self.q_heads[0] - self.kv_heads[0] * group


def _cut(total: int, unit: int, weights: Sequence[float], node: int) -> tuple[int, int]:
    """Node `node`'s range of `total`, cut at multiples of `unit` (a last partial unit: the last node's)."""
    a, b = shares(-(-total // unit), weights)[node]
    return a * unit, min(b * unit, total)


def _head_range(cfg: ModelConfig, head_unit: int, weights: Sequence[float], node: int) -> tuple[int, int]:
    """Query heads of node `node`: whole GQA groups while nodes <= KV heads, else runs of `head_unit`."""
    group = cfg.n_heads // cfg.n_kv_heads
    unit = group if len(weights) <= cfg.n_kv_heads else head_unit
    return _cut(cfg.n_heads, unit, weights, node)


def _default_unit(total: int) -> int:
    """Cuts of 32 values keep Q80 activation blocks whole; widths that are no multiple of 32 cut anywhere."""
    return BLOCK if total % BLOCK == 0 else 1


def node_slice(
    cfg: ModelConfig,
    node: int = 0,
    n_nodes: int = 1,
    ffn_unit: int | None = None,
    moe_unit: int | None = None,
    weights: Sequence[float] | None = None,
    head_unit: int = 1,
) -> NodeSlice:
    """Slice of node `node`; FFN rows are cut in multiples of `ffn_unit` / `moe_unit` values (default 32),
    query heads (beyond n_kv_heads nodes) in runs of `head_unit`, heads, FFN rows and the vocabulary in
    proportion to `weights` (default: evenly). More nodes than query heads is refused."""
    head_runs = -(-cfg.n_heads // head_unit)
    if not 1 <= n_nodes <= max(cfg.n_kv_heads, head_runs):
        limit = max(cfg.n_kv_heads, head_runs)
        why = f"{cfg.n_heads} attention heads" + (
            f" (cut in runs of {head_unit} to keep the output projection's blocks whole)"
            if head_unit > 1
            else ""
        )
        raise DllamaError(f"{n_nodes} nodes cannot share a model with {why}: use at most {limit} nodes")
    weights = list(weights) if weights is not None else [1.0] * n_nodes
    if len(weights) != n_nodes or not all(w > 0 for w in weights):
        raise DllamaError(f"a split of {n_nodes} nodes needs {n_nodes} positive weights, not {weights}")
    group = cfg.n_heads // cfg.n_kv_heads
    q = _head_range(cfg, head_unit, weights, node)
    ffn_unit = ffn_unit or _default_unit(cfg.hidden_dim)
    moe_unit = moe_unit or _default_unit(cfg.moe_hidden_dim)
    widths = (("FFN", cfg.hidden_dim, ffn_unit), ("expert FFN", cfg.moe_hidden_dim, moe_unit))
    for what, total, unit in widths:
        if total % unit:
            raise DllamaError(f"the {what} width {total} cannot be cut in blocks of {unit} values")
        if n_nodes > 1 and 0 < total // unit < n_nodes:
            raise DllamaError(
                f"the {what} width {total} has fewer {unit}-value blocks than the {n_nodes} nodes: use fewer"
            )
    return NodeSlice(
        node,
        n_nodes,
        (q[0] // group, -(-q[1] // group)),
        q,
        _cut(cfg.hidden_dim, ffn_unit, weights, node) if cfg.hidden_dim else (0, 0),
        _cut(cfg.moe_hidden_dim, moe_unit, weights, node) if cfg.moe_hidden_dim else (0, 0),
        shares(cfg.vocab_size, weights)[node],
    )


def plan_slices(model: Model, n_nodes: int, weights: Sequence[float] | None = None) -> list[NodeSlice]:
    """Every node's slice of this model (in proportion to `weights`, default evenly): FFN and head cuts on the
    largest block of the weights cut by columns."""
    cfg = model.config
    units = {"ffn": _default_unit(cfg.hidden_dim), "moe": _default_unit(cfg.moe_hidden_dim), "q": 1}
    for name, spec in get_arch(cfg.arch).table(cfg):
        rng, _, axis = spec.split.partition(":")
        if axis == "in" and rng in units and name in model.weights:
            units[rng] = max(units[rng], weight_type(model.weights[name].dtype).block_values)
    head_unit = units["q"] // math.gcd(units["q"], cfg.head_dim)
    return [
        node_slice(cfg, k, n_nodes, units["ffn"], units["moe"], weights, head_unit) for k in range(n_nodes)
    ]


def slice_bytes(model: Model, sl: NodeSlice, max_seq_len: int, kv_type: str = "f32") -> int:
    """Bytes node `sl.node` holds: its weight slices (the root's embedding aside) and its KV cache."""
    cfg, total = model.config, 0
    for name, spec in get_arch(cfg.arch).table(cfg):
        if name not in model.weights or (spec.split == "root" and sl.node != 0):
            continue
        shape = sliced_shape(spec, cfg, sl)
        lead = int(np.prod(shape[:-2], dtype=np.int64)) if len(shape) > 2 else 1
        total += lead * shape[-2] * row_bytes(model.weights[name].dtype, shape[-1])
    return total + kv_cache_bytes(cfg, sl, max_seq_len, kv_type)


def kv_cache_bytes(cfg: ModelConfig, sl: NodeSlice, max_seq_len: int, kv_type: str = "f32") -> int:
    """Bytes of node `sl.node`'s K and V caches of `kv_type` values for `max_seq_len` positions."""
    return 2 * cfg.n_layers * max_seq_len * sl.n_kv_heads * cfg.head_dim * KV_TYPES[kv_type]


def fit_slices(
    model: Model,
    speeds: Sequence[float],
    memory: Sequence[int],
    kv_rows: Sequence[int],
    names: Sequence[str],
    kv_type: str = "f32",
) -> list[NodeSlice]:
    """Slices in proportion to `speeds` whose weights and `kv_rows` cache positions fit each node's `memory`
    (bytes, 0 = unknown): a node short of memory gets a smaller share; a model they cannot hold is refused."""
    n, weights = len(speeds), [float(s) for s in speeds]
    for _ in range(64):
        slices = plan_slices(model, n, weights)
        need = [slice_bytes(model, sl, rows, kv_type) for sl, rows in zip(slices, kv_rows, strict=True)]
        over = [k for k in range(n) if memory[k] and need[k] > memory[k]]
        if not over:
            return slices
        for k in over:
            weights[k] *= 0.9 * memory[k] / need[k]
    k = over[0]
    raise DllamaError(
        f"the model does not fit: {names[k]} needs {need[k] / 1e9:.2f} GB for its slice"
        f"{' and KV cache' if kv_rows[k] else ''} but has "
        f"{memory[k] / 1e9:.2f} GB free; add nodes, lower --max-seq-len or free memory there"
    )


def _range(spec: TensorSpec, cfg: ModelConfig, sl: NodeSlice) -> tuple[str, int, int] | None:
    """(axis, start, end) of the node's cut of a tensor, or None when it holds all of it."""
    rng, _, axis = spec.split.partition(":")
    if not axis:
        return None
    hd = cfg.head_dim
    a, b = {
        "q": (sl.q_heads[0] * hd, sl.q_heads[1] * hd),
        "kv": (sl.kv_heads[0] * hd, sl.kv_heads[1] * hd),
        "ffn": sl.ffn,
        "moe": sl.moe,
        "vocab": sl.vocab,
    }[rng]
    return axis, a, b


def sliced_shape(spec: TensorSpec, cfg: ModelConfig, sl: NodeSlice) -> tuple[int, ...]:
    """The Weight.shape of node `sl.node`'s part of a tensor."""
    shape = list(spec.shape(cfg))
    cut = _range(spec, cfg, sl)
    if cut is not None:
        axis, a, b = cut
        shape[-1 if axis == "in" or len(shape) == 1 else -2] = b - a
    return (1, *shape) if len(shape) == 1 else tuple(shape)


def node_tensors(cfg: ModelConfig, sl: NodeSlice) -> dict[str, tuple[tuple[int, ...], bool]]:
    """(shape, required) of every tensor node `sl.node` holds: what a worker expects to receive."""
    out = {}
    for name, spec in get_arch(cfg.arch).table(cfg):
        if spec.split == "root" and sl.node != 0:
            continue
        out[name] = (sliced_shape(spec, cfg, sl), not spec.optional or spec.tied_to is not None)
    return out


def _out(w: Weight, a: int, b: int) -> Weight:
    """Output rows [a, b) (vector elements for a vector): a view, no copy."""
    if w.rows == 1 and not w.experts:
        return Weight(w.name, w.dtype, 1, b - a, w.data[:, a:b])
    data = w.data[:, a:b] if w.experts else w.data[a:b]
    return Weight(w.name, w.dtype, b - a, w.cols, data, w.experts)


def _in(w: Weight, a: int, b: int) -> Weight:
    """Input columns [a, b): a copy of whole blocks of every row."""
    if a == 0 and b == w.cols:
        return w
    wt = weight_type(w.dtype)
    if a % wt.block_values or b % wt.block_values:
        raise DllamaError(
            f"{w.name}: its columns [{a}, {b}) for this node do not fall on {wt.ggml_name} block boundaries "
            f"({wt.block_values} values): use another node count"
        )
    lo, hi = (wt.row_bytes(a), wt.row_bytes(b)) if wt.quantized else (a, b)
    return Weight(w.name, w.dtype, w.rows, b - a, w.data[..., lo:hi].copy(), w.experts)


def slice_weights(model: Model, sl: NodeSlice) -> dict[str, Weight]:
    """The weights node `sl.node` needs, by name; node 0 of 1 gets the model's own memory-mapped views."""
    cfg = model.config
    out: dict[str, Weight] = {}
    for name, spec in get_arch(cfg.arch).table(cfg):
        w = model.weights.get(name)
        if w is None or (spec.split == "root" and sl.node != 0):
            continue
        cut = _range(spec, cfg, sl)
        if cut is None:
            out[name] = w
        else:
            axis, a, b = cut
            out[name] = _out(w, a, b) if axis == "out" else _in(w, a, b)
    return out
