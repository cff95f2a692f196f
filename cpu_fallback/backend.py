"""CPU backend: every graph op bound once to a numba kernel and its preallocated buffers."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from cpu_fallback import kernels
from cpu_fallback.threads import ThreadGovernor
from engine.backend import Backend, Program
from engine.errors import DllamaError
from engine.graph import Graph, Op, ropes_then_store
from engine.weights import Weight, vector_f32

Step = Callable[[int], None]


class CpuProgram(Program):
    """Buffers, KV cache and rope tables of one node, with each op pre-bound as a closure over them."""

    def __init__(self, graph: Graph, weights: dict[str, Weight], max_batch: int, n_threads: int = 1):
        cfg = graph.config
        self.graph, self.weights = graph, weights
        self.bufs: dict[str, np.ndarray] = {}
        for name, spec in graph.buffers.items():
            dtype = {"f32": np.float32, "i32": np.int32, "q80": np.uint8}[spec.dtype]
            cols = spec.row_bytes if spec.dtype == "q80" else spec.width
            self.bufs[name] = np.zeros((max_batch, cols), dtype=dtype)
        n_kv = graph.slice.n_kv_heads * cfg.head_dim
        kv_dtype = kernels.KV_DTYPES[graph.kv_type]  # an f16 cache holds the halves' bits as uint16
        rows = graph.n_slots * graph.max_seq_len  # slot s owns rows s*max_seq_len .. (s+1)*max_seq_len-1
        self.k_cache = [np.zeros((rows, n_kv), kv_dtype) for _ in range(cfg.n_layers)]
        self.v_cache = [np.zeros((rows, n_kv), kv_dtype) for _ in range(cfg.n_layers)]
        self.kv_cache_bytes = sum(a.nbytes for a in self.k_cache + self.v_cache)
        scaling = None
        if cfg.rope_scaling is not None:
            s = cfg.rope_scaling
            scaling = (s.factor, s.low_freq_factor, s.high_freq_factor, s.orig_max_seq_len)
        factors = weights.get("rope_freqs.weight")
        self.cos, self.sin = kernels.rope_table(
            cfg.head_dim,
            cfg.rope_theta,
            cfg.rope_neox,
            scaling,
            None if factors is None else vector_f32(factors),
            graph.max_seq_len,
        )
        self.att_scratch = np.zeros((max_batch * max(graph.slice.n_heads, 1), graph.max_seq_len), np.float32)
        self.segments: list[list[Step]] = [self._bind_ops(seg.ops) for seg in graph.segments]
        self.governor = ThreadGovernor(n_threads, kernels.set_threads)

    def pipe(self, name: str) -> np.ndarray:
        return self.bufs[name]

    def run_segments(self, start: int, stop: int, n_tokens: int) -> None:
        """Segments with no host step between them (one node): a decode step under the thread governor."""
        if n_tokens == 1:
            self.governor.run(lambda: Program.run_segments(self, start, stop, 1))
        else:
            Program.run_segments(self, start, stop, n_tokens)

    def run_segment(self, index: int, n_tokens: int) -> None:
        for step in self.segments[index]:
            step(n_tokens)

    # ---- op binding: one closure per op (or per fused run of ops), no lookups at run time ----
    def _bind_ops(self, ops: list[Op]) -> list[Step]:
        """Steps of a segment: adjacent matmuls of one input (q/k/v, gate/up) share one step, which a
        decode pass runs as one kernel launch; so do the runs of ops in FUSIONS. A None binding (the merge of
        a single node's partial sums, added at to_pipe) is no step."""
        steps: list[Step | None] = []
        i = 0
        while i < len(ops):
            j = i + 1
            fused = next((f for f in FUSIONS if f.matches(ops, i)), None)
            if fused is not None:
                j = i + len(fused.kinds)
                steps.append(fused.bind(self, ops[i:j]))
            elif ops[i].kind == "matmul":
                while j < len(ops) and ops[j].kind == "matmul" and ops[j].inputs == ops[i].inputs:
                    j += 1
                steps.append(self._matmuls(ops[i:j]))
            else:
                steps.append(self._bind(ops[i]))
            i = j
        return [step for step in steps if step is not None]

    def _bind(self, op: Op) -> Step | None:
        binder = BINDERS.get(op.kind)
        if binder is None:
            raise ValueError(f"CPU backend has no kernel for op kind {op.kind!r}")
        w = self.weights[op.weight] if op.weight else None
        ins = [self.bufs[i] for i in op.inputs]
        outs = [self.bufs[o] for o in op.outputs]
        return binder(self, op, w, ins, outs)

    @property
    def _single_f32_node(self) -> bool:
        """One node with f32 partial sums: to_pipe adds them to x itself and merge_add has nothing left."""
        return self.graph.slice.n_nodes == 1 and self.bufs["zq"].dtype == np.float32

    # ---- fused runs of ops (FUSIONS): one kernel launch, the same arithmetic as the ops one by one ----
    def _rmsnorm_q80(self, ops: list[Op]) -> Step:
        norm, quant = ops
        w, b = vector_f32(self.weights[norm.weight]), self.bufs
        return kernels.bind_rmsnorm_q80(
            b[norm.inputs[0]], w, norm.params["eps"], b[norm.outputs[0]], b[quant.outputs[0]]
        )

    def _silu_mul_q80(self, ops: list[Op]) -> Step:
        silu, quant = ops
        return kernels.bind_silu_mul_q80(*(self.bufs[n] for n in (*silu.inputs, quant.outputs[0])))

    def _rope_kv_store(self, ops: list[Op]) -> Step:
        rope_q, _, store = ops
        b, hd, neox = self.bufs, rope_q.params["head_dim"], rope_q.params["neox"]
        kc, vc = self.k_cache[store.params["layer"]], self.v_cache[store.params["layer"]]
        k, v, pos, *slot = (b[n] for n in store.inputs)
        slots = (slot[0], self.graph.n_slots, self.graph.max_seq_len) if slot else None
        q = b[rope_q.inputs[0]]
        return kernels.bind_rope_kv_store(q, k, v, pos[:, 0], self.cos, self.sin, hd, neox, kc, vc, slots)

    def _embedding(self, op: Op, w: Weight, ins: list, outs: list) -> Step:
        tok, x = ins[0], outs[0]
        return lambda n: kernels.embedding(w.data, w.dtype, tok[:n, 0], x[:n])

    def _rmsnorm(self, op: Op, w: Weight, ins: list, outs: list) -> Step:
        return kernels.bind_rmsnorm(ins[0], vector_f32(w), op.params["eps"], outs[0])

    def _quantize_q80(self, op: Op, w: None, ins: list, outs: list) -> Step:
        return kernels.bind_quantize_q80(ins[0], outs[0])

    def _matmuls(self, group: list[Op]) -> Step:
        """One step for matmuls of one input buffer."""
        mats = [(self.weights[op.weight].data, self.weights[op.weight].dtype) for op in group]
        outs = [self.bufs[op.outputs[0]] for op in group]
        return kernels.bind_matmuls(mats, self.bufs[group[0].inputs[0]], outs)

    def _matmul(self, op: Op, w: Weight, ins: list, outs: list) -> Step:
        return self._matmuls([op])

    def _add_bias(self, op: Op, w: Weight, ins: list, outs: list) -> Step:
        return kernels.bind_add_bias(outs[0], vector_f32(w))

    def _rope(self, op: Op, w: None, ins: list, outs: list) -> Step:
        hd, neox = op.params["head_dim"], op.params["neox"]
        return kernels.bind_rope(ins[0], ins[1][:, 0], self.cos, self.sin, hd, neox)

    def _kv_store(self, op: Op, w: None, ins: list, outs: list) -> Step:
        k, v, pos = ins[:3]
        kc, vc = self.k_cache[op.params["layer"]], self.v_cache[op.params["layer"]]
        if len(ins) == 3:
            return kernels.bind_kv_store(kc, vc, pos[:, 0], k, v)
        runs, seq = self._slot_runs(ins[3]), self.graph.max_seq_len

        def step(n: int) -> None:
            for a, b, s in runs(n):
                rows = slice(s * seq, (s + 1) * seq)
                kernels.kv_store(kc[rows], vc[rows], pos[a:b, 0], k[a:b], v[a:b])

        return step

    def _attention(self, op: Op, w: None, ins: list, outs: list) -> Step:
        p = op.params
        q, pos, out = ins[0], ins[1], outs[0]
        kc, vc = self.k_cache[p["layer"]], self.v_cache[p["layer"]]
        nh, nkv, hd, scratch = p["n_heads"], p["n_kv_heads"], p["head_dim"], self.att_scratch
        group, q_offset = p["group"], p["q_offset"]
        if len(ins) == 2:
            return kernels.bind_attention(q, kc, vc, pos[:, 0], nh, nkv, hd, out, scratch, group, q_offset)
        runs, seq = self._slot_runs(ins[2]), self.graph.max_seq_len

        def step(n: int) -> None:
            for a, b, s in runs(n):
                rows = slice(s * seq, (s + 1) * seq)
                args = (q[a:b], kc[rows], vc[rows], pos[a:b, 0], nh, nkv, hd, out[a:b], scratch)
                kernels.attention(*args, group, q_offset)

        return step

    def _slot_runs(self, slot: np.ndarray) -> Callable[[int], list[tuple[int, int, int]]]:
        """(first row, end row, slot) of each run of consecutive rows in one KV slot; a slot outside the
        cache is a DllamaError."""
        n_slots = self.graph.n_slots

        def runs(n: int) -> list[tuple[int, int, int]]:
            s = slot[:n, 0]
            if n and (s.min() < 0 or s.max() >= n_slots):
                raise DllamaError(f"a KV slot outside 0..{n_slots - 1}: {s.tolist()}")
            cuts = [0, *(np.flatnonzero(s[1:] != s[:-1]) + 1).tolist(), n]
            return [(a, b, int(s[a])) for a, b in zip(cuts[:-1], cuts[1:], strict=True) if b > a]

        return runs

    def _silu_mul(self, op: Op, w: None, ins: list, outs: list) -> Step:
        return kernels.bind_silu_mul(*ins)

    def _moe_route(self, op: Op, w: None, ins: list, outs: list) -> Step:
        logits, (idx, weights) = ins[0], outs
        k, normalize = op.params["k"], op.params["normalize"]
        return lambda n: kernels.moe_route(logits[:n], k, normalize, idx[:n], weights[:n])

    def _moe_matmul(self, op: Op, w: Weight, ins: list, outs: list) -> Step:
        (x, idx), out = ins, outs[0]
        mm = kernels.moe_matmul_q80 if x.dtype == np.uint8 else kernels.moe_matmul
        return lambda n: mm(w.data, w.dtype, x[:n], idx[:n], out[:n])

    def _moe_sum(self, op: Op, w: None, ins: list, outs: list) -> Step:
        (ys, weights), y = ins, outs[0]
        return lambda n: kernels.moe_sum(ys[:n], weights[:n], y[:n])

    def _to_pipe(self, op: Op, w: None, ins: list, outs: list) -> Step:
        y, zq, slot = ins[0], outs[0], op.params["slot"]
        if self._single_f32_node:  # x += y now; the merge_add after the (local) sync is then no step
            return kernels.bind_add(self.bufs["x"], [y])
        width = zq.shape[1] // self.graph.slice.n_nodes
        dst = zq[:, slot * width : (slot + 1) * width]
        if zq.dtype == np.uint8:
            return kernels.bind_quantize_q80(y, dst)
        rows = kernels._row_views(y, dst)

        def copy(n: int) -> None:
            yv, dv = rows(n)
            np.copyto(dv, yv)

        return copy

    def _merge_add(self, op: Op, w: None, ins: list, outs: list) -> Step | None:
        """x += every node's slot in node order (the same order everywhere keeps replicas bit-identical);
        nothing on a single f32 node, whose to_pipe added its partial sum already."""
        zq, x = ins[0], outs[0]
        if self._single_f32_node:
            return None
        if zq.dtype == np.uint8:
            return kernels.bind_merge_add_q80(x, zq)
        dim, n_slots = x.shape[1], self.graph.slice.n_nodes
        return kernels.bind_add(x, [zq[:, s * dim : (s + 1) * dim] for s in range(n_slots)])


@dataclass(frozen=True)
class Fusion:
    """A run of adjacent op kinds that one kernel launch runs when `when(*ops)` holds (each op reads what
    the one before wrote), bound by `bind(program, ops)`."""

    kinds: tuple[str, ...]
    when: Callable[..., bool]
    bind: Callable[[CpuProgram, list[Op]], Step]

    def matches(self, ops: list[Op], i: int) -> bool:
        run = ops[i : i + len(self.kinds)]
        return tuple(op.kind for op in run) == self.kinds and self.when(*run)


def _feeds(a: Op, b: Op) -> bool:
    return b.inputs[0] == a.outputs[0]


FUSIONS = (
    # the norm before matmuls with Q80 inputs, and the FFN's gating before its down projection
    Fusion(("rmsnorm", "quantize_q80"), _feeds, CpuProgram._rmsnorm_q80),
    Fusion(("silu_mul", "quantize_q80"), _feeds, CpuProgram._silu_mul_q80),
    # RoPE of q and of k by the same positions, then k and v into the cache
    Fusion(("rope", "rope", "kv_store"), ropes_then_store, CpuProgram._rope_kv_store),
)

BINDERS: dict[str, Callable[..., Step | None]] = {
    "embedding": CpuProgram._embedding,
    "rmsnorm": CpuProgram._rmsnorm,
    "quantize_q80": CpuProgram._quantize_q80,
    "matmul": CpuProgram._matmul,
    "add_bias": CpuProgram._add_bias,
    "rope": CpuProgram._rope,
    "kv_store": CpuProgram._kv_store,
    "attention": CpuProgram._attention,
    "silu_mul": CpuProgram._silu_mul,
    "moe_route": CpuProgram._moe_route,
    "moe_matmul": CpuProgram._moe_matmul,
    "moe_sum": CpuProgram._moe_sum,
    "to_pipe": CpuProgram._to_pipe,
    "merge_add": CpuProgram._merge_add,
}
OP_KINDS = frozenset(BINDERS)  # the op kinds this backend implements


class CpuBackend(Backend):
    """numpy + numba on this machine's cores."""

    name = "cpu"

    def __init__(self, n_threads: int | None = None):
        self.n_threads = n_threads or os.cpu_count() or 1
        kernels.set_threads(self.n_threads)
        self.description = f"CPU (numba, {self.n_threads} thread{'s' if self.n_threads > 1 else ''})"

    def compile(self, graph: Graph, weights: dict[str, Weight], max_batch: int) -> Program:
        return CpuProgram(graph, weights, max_batch, self.n_threads)
