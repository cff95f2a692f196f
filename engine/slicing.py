"""Tensor-parallel slicing (spec 4.9): which rows/columns of every weight node n of N owns.

Attention is cut by KV heads (each node keeps whole GQA groups), the FFN and the classifier by output rows on
32-element block boundaries; slices may be uneven, so any node count up to n_kv_heads works.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.config import ModelConfig
from engine.errors import DllamaError
from engine.weights import BLOCK, Model, Weight, row_bytes


def split(total_units: int, n_nodes: int, node: int) -> tuple[int, int]:
    """Unit range [start, end) of `node` when `total_units` are shared as evenly as possible."""
    base, extra = divmod(total_units, n_nodes)
    start = node * base + min(node, extra)
    return start, start + base + (1 if node < extra else 0)


@dataclass(frozen=True)
class NodeSlice:
    """The part of the model node `node` of `n_nodes` computes."""

    node: int
    n_nodes: int
    kv_heads: tuple[int, int]  # [start, end) of KV heads
    q_heads: tuple[int, int]  # the query heads of those KV groups
    ffn: tuple[int, int]  # hidden (FFN) rows
    vocab: tuple[int, int]  # classifier rows

    @property
    def n_heads(self) -> int:
        return self.q_heads[1] - self.q_heads[0]

    @property
    def n_kv_heads(self) -> int:
        return self.kv_heads[1] - self.kv_heads[0]


def node_slice(cfg: ModelConfig, node: int = 0, n_nodes: int = 1) -> NodeSlice:
    """Slice of node `node`; more nodes than KV heads is refused (a query head needs its whole KV head)."""
    if not 1 <= n_nodes <= cfg.n_kv_heads:
        raise DllamaError(
            f"{n_nodes} nodes cannot share a model with {cfg.n_kv_heads} KV heads: "
            f"use at most {cfg.n_kv_heads} nodes"
        )
    group = cfg.n_heads // cfg.n_kv_heads
    kv = split(cfg.n_kv_heads, n_nodes, node)
    ffn_blocks = split(cfg.hidden_dim // BLOCK, n_nodes, node) if cfg.hidden_dim % BLOCK == 0 else None
    ffn = (
        (ffn_blocks[0] * BLOCK, ffn_blocks[1] * BLOCK) if ffn_blocks else split(cfg.hidden_dim, n_nodes, node)
    )
    vocab = split(cfg.vocab_size, n_nodes, node)
    return NodeSlice(node, n_nodes, kv, (kv[0] * group, kv[1] * group), ffn, vocab)


def _rows(w: Weight, start: int, end: int) -> Weight:
    """A row slice: a view, no copy."""
    return Weight(w.name, w.dtype, end - start, w.cols, w.data[start:end])


def _cols(w: Weight, start: int, end: int) -> Weight:
    """A column slice: copies whole blocks of every row (block-aligned for quantized types)."""
    if (start == 0 and end == w.cols) or w.rows == 0:
        return w
    unit = BLOCK if w.dtype in ("q40", "q41", "q80") else 1
    if start % unit or end % unit:
        raise DllamaError(f"{w.name}: column slice [{start}, {end}) is not on {unit}-value block boundaries")
    b0, b1 = row_bytes(w.dtype, start), row_bytes(w.dtype, end)
    if w.dtype in ("q40", "q41", "q80"):
        data = np.ascontiguousarray(w.data[:, b0:b1])
    else:
        data = np.ascontiguousarray(w.data[:, start:end])
    return Weight(w.name, w.dtype, w.rows, end - start, data)


def slice_weights(model: Model, sl: NodeSlice) -> dict[str, Weight]:
    """The weights node `sl.node` needs, by name; node 0 of 1 gets the model's own memory-mapped views."""
    cfg = model.config
    hd = cfg.head_dim
    q0, q1 = sl.q_heads[0] * hd, sl.q_heads[1] * hd
    k0, k1 = sl.kv_heads[0] * hd, sl.kv_heads[1] * hd
    out: dict[str, Weight] = {}
    for name, w in model.weights.items():
        kind = name.split(".")[-2] if name.startswith("blk.") else name
        if kind in ("attn_q",):
            out[name] = _rows(w, q0, q1)
        elif kind in ("attn_k", "attn_v"):
            out[name] = _rows(w, k0, k1)
        elif kind == "attn_output":
            out[name] = _cols(w, q0, q1)
        elif kind in ("ffn_gate", "ffn_up"):
            out[name] = _rows(w, *sl.ffn)
        elif kind == "ffn_down":
            out[name] = _cols(w, *sl.ffn)
        elif name == "token_embd.weight":
            if sl.node == 0:
                out[name] = w
            if "output.weight" not in model.weights:  # tied classifier
                out["output.weight"] = _rows(w, *sl.vocab)
        elif name == "output.weight":
            out[name] = _rows(w, *sl.vocab)
        else:  # norms, rope factors: replicated
            out[name] = w
    return out
