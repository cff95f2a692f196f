"""The forward pass as data: a per-layer sequence of named ops for node i of N, which any backend executes.

Buffers are 2-D, one row per token of the batch. A segment is a run of ops followed by at most one network
sync; on a single node the syncs are local no-ops and `merge_add` sums the one slice there is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from engine.config import ModelConfig
from engine.slicing import NodeSlice
from engine.weights import BLOCK, BLOCK_BYTES

ACT_TYPES = ("f32", "q80")


@dataclass(frozen=True)
class BufferSpec:
    """A batch-addressed buffer: `width` values per token row, stored as f32, i32 or Q80 blocks."""

    width: int
    dtype: str = "f32"

    @property
    def row_bytes(self) -> int:
        return self.width // BLOCK * BLOCK_BYTES["q80"] if self.dtype == "q80" else self.width * 4


@dataclass(frozen=True)
class Op:
    """One step of the forward pass: `kind` decides the kernel, buffers and weight are referenced by name."""

    kind: str
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    weight: str | None = None
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Sync:
    """A network step after a segment: `pipe` is exchanged in the named way between nodes."""

    pipe: str
    kind: str  # "broadcast_root" (x: root -> all), "all_slices" (zq: all <-> all), "gather_root" (logits)


@dataclass
class Segment:
    ops: list[Op] = field(default_factory=list)
    sync: Sync | None = None


@dataclass
class Graph:
    """Everything a backend needs to allocate and run one node's share of the model."""

    config: ModelConfig
    slice: NodeSlice
    act: str  # "f32" or "q80": the number format of matmul inputs and of the network syncs
    max_seq_len: int
    buffers: dict[str, BufferSpec] = field(default_factory=dict)
    segments: list[Segment] = field(default_factory=list)

    def ops(self):
        """All ops in execution order."""
        return [op for seg in self.segments for op in seg.ops]


class _Builder:
    """Appends ops to the current segment; inserts the Q80 quantisation of matmul inputs when act is q80."""

    def __init__(self, g: Graph):
        self.g = g
        self.seg = Segment()
        self.quantized: set[str] = set()  # buffers whose _q twin is up to date

    def buf(self, name: str, width: int, dtype: str = "f32") -> str:
        self.g.buffers[name] = BufferSpec(width, dtype)
        return name

    def op(self, kind: str, name: str, inputs, outputs, weight=None, **params) -> None:
        self.seg.ops.append(Op(kind, name, tuple(inputs), tuple(outputs), weight, params))
        self.quantized.difference_update(outputs)

    def end_segment(self, sync: Sync | None) -> None:
        self.seg.sync = sync
        self.g.segments.append(self.seg)
        self.seg = Segment()

    def matmul(self, name: str, weight: str, x: str, out: str) -> None:
        if self.g.act == "q80":
            xq = x + "_q"
            if x not in self.quantized:
                self.buf(xq, self.g.buffers[x].width, "q80")
                self.op("quantize_q80", name + "_quant", [x], [xq])
                self.quantized.add(x)
            x = xq
        self.op("matmul", name, [x], [out], weight)

    def partial(self, name: str, y: str) -> None:
        """This node's partial sum of the residual update goes into its slot of the zq pipe."""
        self.op("to_pipe", name, [y], ["zq"], slot=self.g.slice.node)
        self.end_segment(Sync("zq", "all_slices"))


def build_graph(cfg: ModelConfig, sl: NodeSlice, act: str = "f32", max_seq_len: int = 4096) -> Graph:
    """The forward pass of node `sl.node`: embedding, n_layers x (attention, FFN), final norm, classifier."""
    g = Graph(cfg, sl, act, max_seq_len)
    b = _Builder(g)
    hd = cfg.head_dim
    n_q, n_kv = sl.n_heads * hd, sl.n_kv_heads * hd
    n_ff = sl.ffn[1] - sl.ffn[0]
    b.buf("tok", 1, "i32")  # token ids (root)
    b.buf("pos", 1, "i32")  # positions
    b.buf("x", cfg.dim)  # residual stream, replicated on every node
    # every node's partial sum, one dim-wide slot per node; Q80 only where it crosses the network: a single
    # node keeps its residual updates in f32 (the residual stream is never quantised locally)
    b.buf("zq", cfg.dim * sl.n_nodes, act if sl.n_nodes > 1 else "f32")
    for name, width in (
        ("h", cfg.dim),
        ("q", n_q),
        ("k", n_kv),
        ("v", n_kv),
        ("att", n_q),
        ("y", cfg.dim),
        ("gate", n_ff),
        ("up", n_ff),
        ("logits", sl.vocab[1] - sl.vocab[0]),
    ):
        b.buf(name, width)
    rope = dict(head_dim=hd, neox=cfg.rope_neox)

    # ---- start: the root looks up embeddings and sends x to every worker ----
    if sl.node == 0:
        b.op("embedding", "embedding", ["tok"], ["x"], "token_embd.weight")
    b.end_segment(Sync("x", "broadcast_root"))

    for layer in range(cfg.n_layers):
        p = f"blk.{layer}."
        # ---- attention ----
        if layer > 0:
            b.op("merge_add", p + "merge_ffn", ["zq"], ["x"])
        b.op("rmsnorm", p + "attn_norm", ["x"], ["h"], p + "attn_norm.weight", eps=cfg.norm_eps)
        b.matmul(p + "q", p + "attn_q.weight", "h", "q")
        b.matmul(p + "k", p + "attn_k.weight", "h", "k")
        b.matmul(p + "v", p + "attn_v.weight", "h", "v")
        b.op("rope", p + "rope_q", ["q", "pos"], ["q"], **rope)
        b.op("rope", p + "rope_k", ["k", "pos"], ["k"], **rope)
        b.op("kv_store", p + "kv_store", ["k", "v", "pos"], [], layer=layer)
        b.op(
            "attention",
            p + "attention",
            ["q", "pos"],
            ["att"],
            layer=layer,
            n_heads=sl.n_heads,
            n_kv_heads=sl.n_kv_heads,
            head_dim=hd,
        )
        b.matmul(p + "wo", p + "attn_output.weight", "att", "y")
        b.partial(p + "attn_out", "y")
        # ---- feed-forward (SwiGLU) ----
        b.op("merge_add", p + "merge_att", ["zq"], ["x"])
        b.op("rmsnorm", p + "ffn_norm", ["x"], ["h"], p + "ffn_norm.weight", eps=cfg.norm_eps)
        b.matmul(p + "gate", p + "ffn_gate.weight", "h", "gate")
        b.matmul(p + "up", p + "ffn_up.weight", "h", "up")
        b.op("silu_mul", p + "silu_mul", ["gate", "up"], ["gate"])
        b.matmul(p + "down", p + "ffn_down.weight", "gate", "y")
        b.partial(p + "ffn_out", "y")

    # ---- final norm and this node's rows of the classifier; the root gathers the logits ----
    b.op("merge_add", "final_merge", ["zq"], ["x"])
    b.op("rmsnorm", "final_norm", ["x"], ["h"], "output_norm.weight", eps=cfg.norm_eps)
    b.matmul("classifier", "output.weight", "h", "logits")
    b.end_segment(Sync("logits", "gather_root"))
    return g
