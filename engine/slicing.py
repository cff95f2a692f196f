"""Tensor-parallel slicing (spec 4.9): which rows/columns of every weight node n of N owns.

Attention is cut by KV heads (each node keeps whole GQA groups), the FFN rows (dense and per expert) and the
classifier by output rows. The split rule of every tensor comes from its architecture's table. FFN cuts
fall on the block boundaries of the column-sliced weights (256-value super-blocks for K-quants, 32 values
otherwise), so slices may be uneven; any node count up to n_kv_heads works.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.arch import get_arch
from engine.arch.base import TensorSpec
from engine.config import ModelConfig
from engine.errors import DllamaError
from engine.weight_types import weight_type
from engine.weights import BLOCK, Model, Weight


def split(total_units: int, n_nodes: int, node: int) -> tuple[int, int]:
    """Unit range [start, end) of `node` when `total_units` are shared as evenly as possible."""
    base, extra = divmod(total_units, n_nodes)
    start = node * base + min(node, extra)
    return start, start + base + (1 if node < extra else 0)


@dataclass(frozen=True)
class NodeSlice:
    """The part of the model node `node` of `n_nodes` computes; ranges are [start, end) in values."""

    node: int
    n_nodes: int
    kv_heads: tuple[int, int]  # KV heads
    q_heads: tuple[int, int]  # the query heads of those KV groups
    ffn: tuple[int, int]  # dense FFN rows
    moe: tuple[int, int]  # rows of every expert's FFN
    vocab: tuple[int, int]  # classifier rows

    @property
    def n_heads(self) -> int:
        return self.q_heads[1] - self.q_heads[0]

    @property
    def n_kv_heads(self) -> int:
        return self.kv_heads[1] - self.kv_heads[0]


def _cut(total: int, unit: int, n_nodes: int, node: int) -> tuple[int, int]:
    a, b = split(total // unit, n_nodes, node)
    return a * unit, b * unit


def _default_unit(total: int) -> int:
    """Cuts of 32 values keep Q80 activation blocks whole; widths that are no multiple of 32 cut anywhere."""
    return BLOCK if total % BLOCK == 0 else 1


def node_slice(
    cfg: ModelConfig,
    node: int = 0,
    n_nodes: int = 1,
    ffn_unit: int | None = None,
    moe_unit: int | None = None,
) -> NodeSlice:
    """Slice of node `node`; FFN rows are cut in multiples of `ffn_unit` / `moe_unit` values (default 32).
    More nodes than KV heads is refused (a query head needs its whole KV head)."""
    if not 1 <= n_nodes <= cfg.n_kv_heads:
        raise DllamaError(
            f"{n_nodes} nodes cannot share a model with {cfg.n_kv_heads} KV heads: "
            f"use at most {cfg.n_kv_heads} nodes"
        )
    group = cfg.n_heads // cfg.n_kv_heads
    kv = split(cfg.n_kv_heads, n_nodes, node)
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
        kv,
        (kv[0] * group, kv[1] * group),
        _cut(cfg.hidden_dim, ffn_unit, n_nodes, node),
        _cut(cfg.moe_hidden_dim, moe_unit, n_nodes, node),
        split(cfg.vocab_size, n_nodes, node),
    )


def plan_slices(model: Model, n_nodes: int) -> list[NodeSlice]:
    """Every node's slice of this model: FFN cuts on the largest block of the weights cut by columns."""
    cfg = model.config
    units = {"ffn": _default_unit(cfg.hidden_dim), "moe": _default_unit(cfg.moe_hidden_dim)}
    for name, spec in get_arch(cfg.arch).table(cfg):
        rng, _, axis = spec.split.partition(":")
        if axis == "in" and rng in units and name in model.weights:
            units[rng] = max(units[rng], weight_type(model.weights[name].dtype).block_values)
    return [node_slice(cfg, k, n_nodes, units["ffn"], units["moe"]) for k in range(n_nodes)]


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
