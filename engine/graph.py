"""The forward pass as data: the sequence of named ops node i of N runs, which any backend executes.

Buffers are 2-D, one row per token of the batch. A segment is a run of ops followed by at most one network
sync; on a single node the syncs are local no-ops and `merge_add` sums the one slot there is. The layer
blocks below (attention, dense and mixture-of-experts FFN) are what the architectures in engine/arch/ compose.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from engine.config import ModelConfig
from engine.slicing import NodeSlice
from engine.weight_types import weight_type

ACT_TYPES = ("f32", "q80")

# Every op kind a graph can contain; each backend implements all of them (tests/test_backends.py checks).
OP_KINDS = (
    "embedding",  # tok -> x: rows of the embedding table, de-quantised
    "rmsnorm",  # x -> out: each group of len(weight) values scaled by weight / rms (per head for q/k norms)
    "quantize_q80",  # f32 -> Q80 blocks (matmul inputs with --buffer-float-type q80)
    "matmul",  # x (f32 or Q80) -> out = W x, W in its native encoding
    "add_bias",  # x += bias
    "rope",  # rotate q or k pairs (interleaved or NeoX) by the token's position
    "kv_store",  # k, v -> the layer's KV cache rows at the tokens' positions
    "attention",  # causal grouped-query attention of q over the cache
    "silu_mul",  # gate = silu(gate) * up
    "moe_route",  # router logits -> the top-k experts and their weights
    "moe_matmul",  # per token and slot: out_s = W[expert_s] x (x shared by the slots or one per slot)
    "moe_sum",  # y = sum over slots of weight_s * out_s
    "to_pipe",  # this node's partial sum -> its slot of the zq pipe (quantised for a Q80 network)
    "merge_add",  # x += every node's slot of zq, in node order
)


@dataclass(frozen=True)
class BufferSpec:
    """A batch-addressed buffer: `width` values per token row, stored as f32, i32 or Q80 blocks."""

    width: int
    dtype: str = "f32"

    @property
    def row_bytes(self) -> int:
        return weight_type("q80").row_bytes(self.width) if self.dtype == "q80" else self.width * 4


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
    kv_type: str = "f32"  # the KV cache's number format: "f32" or "f16" (engine.slicing.KV_TYPES)
    n_slots: int = 1  # sequences the KV cache holds, max_seq_len rows each; >1 adds the per-row `slot` buffer

    def ops(self) -> list[Op]:
        """All ops in execution order."""
        return [op for seg in self.segments for op in seg.ops]


def ropes_then_store(rope_q: Op, rope_k: Op, store: Op) -> bool:
    """rope q and rope k by one position buffer and one rotation, then kv_store of the rotated k: the run a
    backend may record as one kernel (each layer's attention block has it)."""
    same = rope_q.params == rope_k.params and rope_q.inputs[1] == rope_k.inputs[1] == store.inputs[2]
    return same and store.inputs[0] == rope_k.outputs[0] != rope_q.outputs[0]


class Builder:
    """Appends ops to the current segment; inserts the Q80 quantisation of matmul inputs when act is q80."""

    def __init__(self, g: Graph):
        self.g, self.cfg, self.sl = g, g.config, g.slice
        self.seg = Segment()
        self.quantized: set[str] = set()  # buffers whose _q twin is up to date

    def buf(self, name: str, width: int, dtype: str = "f32") -> str:
        self.g.buffers[name] = BufferSpec(width, dtype)
        return name

    def op(self, kind: str, name: str, inputs, outputs, weight: str | None = None, **params) -> None:
        self.seg.ops.append(Op(kind, name, tuple(inputs), tuple(outputs), weight, params))
        self.quantized.difference_update(outputs)

    def end_segment(self, sync: Sync | None) -> None:
        self.seg.sync = sync
        self.g.segments.append(self.seg)
        self.seg = Segment()

    def matmul(
        self,
        name: str,
        weight: str,
        x: str,
        out: str,
        *,
        kind: str = "matmul",
        quantize: bool = True,
        extra: tuple[str, ...] = (),
        **params,
    ) -> None:
        """out = W x (or an expert matmul); with q80 activations x is quantised once until it changes."""
        if quantize and self.g.act == "q80":
            xq = x + "_q"
            if x not in self.quantized:
                self.buf(xq, self.g.buffers[x].width, "q80")
                self.op("quantize_q80", name + "_quant", [x], [xq])
                self.quantized.add(x)
            x = xq
        self.op(kind, name, [x, *extra], [out], weight, **params)

    def partial(self, name: str, y: str) -> None:
        """This node's partial sum of the residual update goes into its slot of the zq pipe."""
        self.op("to_pipe", name, [y], ["zq"], slot=self.sl.node)
        self.end_segment(Sync("zq", "all_slices"))


# ---------------------------------------------------------------------------------------------------------
# Layer blocks. Each starts by adding the previous block's partial sums (from every node) to the residual
# stream x and ends with this node's partial sum of its own update in the zq pipe.
# ---------------------------------------------------------------------------------------------------------


def attention(b: Builder, layer: int, *, qkv_bias: bool = False, qk_norm: bool = False) -> None:
    """Pre-norm grouped-query attention over this node's heads: [q/k/v biases], [per-head q/k RMSNorm], RoPE,
    KV cache, causal attention, output projection of this node's heads."""
    cfg, sl, p = b.cfg, b.sl, f"blk.{layer}."
    hd, group = cfg.head_dim, cfg.n_heads // cfg.n_kv_heads
    b.buf("h", cfg.dim)
    b.buf("q", sl.n_heads * hd)
    b.buf("k", sl.n_kv_heads * hd)
    b.buf("v", sl.n_kv_heads * hd)
    b.buf("att", sl.n_heads * hd)
    b.buf("y", cfg.dim)
    if layer > 0:
        b.op("merge_add", p + "merge_ffn", ["zq"], ["x"])
    b.op("rmsnorm", p + "attn_norm", ["x"], ["h"], p + "attn_norm.weight", eps=cfg.norm_eps)
    for t in ("q", "k", "v"):
        b.matmul(p + t, f"{p}attn_{t}.weight", "h", t)
        if qkv_bias:
            b.op("add_bias", f"{p}{t}_bias", [t], [t], f"{p}attn_{t}.bias")
    if qk_norm:
        for t in ("q", "k"):
            b.op("rmsnorm", f"{p}{t}_norm", [t], [t], f"{p}attn_{t}_norm.weight", eps=cfg.norm_eps)
    b.op("rope", p + "rope_q", ["q", "pos"], ["q"], head_dim=hd, neox=cfg.rope_neox)
    b.op("rope", p + "rope_k", ["k", "pos"], ["k"], head_dim=hd, neox=cfg.rope_neox)
    seq = ["pos", "slot"] if b.g.n_slots > 1 else ["pos"]  # a row's slot picks its sequence's cache rows
    b.op("kv_store", p + "kv_store", ["k", "v", *seq], [], layer=layer)
    b.op(
        "attention",
        p + "attention",
        ["q", *seq],
        ["att"],
        layer=layer,
        n_heads=sl.n_heads,
        n_kv_heads=sl.n_kv_heads,
        head_dim=hd,
        group=group,
        q_offset=sl.q_offset(group),
    )
    b.matmul(p + "wo", p + "attn_output.weight", "att", "y")
    b.partial(p + "attn_out", "y")


def feed_forward(b: Builder, layer: int) -> None:
    """Pre-norm SwiGLU FFN over this node's rows: down(silu(gate(h)) * up(h))."""
    cfg, p = b.cfg, f"blk.{layer}."
    n_ff = b.sl.ffn[1] - b.sl.ffn[0]
    b.buf("gate", n_ff)
    b.buf("up", n_ff)
    b.op("merge_add", p + "merge_att", ["zq"], ["x"])
    b.op("rmsnorm", p + "ffn_norm", ["x"], ["h"], p + "ffn_norm.weight", eps=cfg.norm_eps)
    b.matmul(p + "gate", p + "ffn_gate.weight", "h", "gate")
    b.matmul(p + "up", p + "ffn_up.weight", "h", "up")
    b.op("silu_mul", p + "silu_mul", ["gate", "up"], ["gate"])
    b.matmul(p + "down", p + "ffn_down.weight", "gate", "y")
    b.partial(p + "ffn_out", "y")


def moe_feed_forward(b: Builder, layer: int, *, normalize: bool) -> None:
    """Pre-norm mixture of SwiGLU experts: the router picks k experts per token (every node computes the
    same routing from the same x); each node runs its rows of those experts, summed by the routing weights."""
    cfg, p = b.cfg, f"blk.{layer}."
    k, n_ff = cfg.n_active_experts, b.sl.moe[1] - b.sl.moe[0]
    b.buf("router", cfg.n_experts)
    b.buf("moe_idx", k, "i32")
    b.buf("moe_w", k)
    b.buf("moe_gate", k * n_ff)
    b.buf("moe_up", k * n_ff)
    b.buf("moe_y", k * cfg.dim)
    b.op("merge_add", p + "merge_att", ["zq"], ["x"])
    b.op("rmsnorm", p + "ffn_norm", ["x"], ["h"], p + "ffn_norm.weight", eps=cfg.norm_eps)
    b.matmul(p + "router", p + "ffn_gate_inp.weight", "h", "router", quantize=False)
    b.op("moe_route", p + "route", ["router"], ["moe_idx", "moe_w"], k=k, normalize=normalize)
    experts = dict(kind="moe_matmul", extra=("moe_idx",), slots=k)
    b.matmul(p + "gate", p + "ffn_gate_exps.weight", "h", "moe_gate", **experts)
    b.matmul(p + "up", p + "ffn_up_exps.weight", "h", "moe_up", **experts)
    b.op("silu_mul", p + "silu_mul", ["moe_gate", "moe_up"], ["moe_gate"])
    b.matmul(p + "down", p + "ffn_down_exps.weight", "moe_gate", "moe_y", **experts)
    b.op("moe_sum", p + "moe_sum", ["moe_y", "moe_w"], ["y"], slots=k)
    b.partial(p + "ffn_out", "y")


# ---------------------------------------------------------------------------------------------------------
# The whole forward pass
# ---------------------------------------------------------------------------------------------------------


def build_graph(
    cfg: ModelConfig,
    sl: NodeSlice,
    act: str = "f32",
    max_seq_len: int = 4096,
    kv_type: str = "f32",
    n_slots: int = 1,
) -> Graph:
    """The forward pass of node `sl.node`: embedding, n_layers x the architecture's layer, final norm,
    this node's rows of the classifier; its KV cache holds `kv_type` values for `n_slots` sequences."""
    from engine.arch import get_arch

    layer_block = get_arch(cfg.arch).layer
    g = Graph(cfg, sl, act, max_seq_len, kv_type=kv_type, n_slots=n_slots)
    b = Builder(g)
    b.buf("tok", 1, "i32")  # token ids (root)
    b.buf("pos", 1, "i32")  # positions
    if n_slots > 1:
        b.buf("slot", 1, "i32")  # each row's sequence: which max_seq_len rows of the KV cache it uses
    b.buf("x", cfg.dim)  # residual stream, replicated on every node
    # every node's partial sum, one dim-wide slot per node; Q80 only where it crosses the network: a single
    # node keeps its residual updates in f32 (the residual stream is never quantised locally)
    b.buf("zq", cfg.dim * sl.n_nodes, act if sl.n_nodes > 1 else "f32")
    b.buf("h", cfg.dim)
    b.buf("logits", sl.vocab[1] - sl.vocab[0])

    # ---- start: the root looks up embeddings and sends x to every worker ----
    if sl.node == 0:
        b.op("embedding", "embedding", ["tok"], ["x"], "token_embd.weight")
    b.end_segment(Sync("x", "broadcast_root"))

    for layer in range(cfg.n_layers):
        layer_block(b, layer)

    # ---- final norm and this node's rows of the classifier; the root gathers the logits ----
    b.op("merge_add", "final_merge", ["zq"], ["x"])
    b.op("rmsnorm", "final_norm", ["x"], ["h"], "output_norm.weight", eps=cfg.norm_eps)
    b.matmul("classifier", "output.weight", "h", "logits")
    b.end_segment(Sync("logits", "gather_root"))
    return g
