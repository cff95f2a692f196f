"""CPU backend: every graph op bound once to a numba kernel and its preallocated buffers."""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np

from cpu_fallback import kernels
from engine.backend import Backend, Program
from engine.graph import Graph, Op
from engine.weights import BLOCK, BLOCK_BYTES, Weight

Step = Callable[[int], None]


class CpuProgram(Program):
    """Buffers, KV cache and rope tables of one node, with each op pre-bound as a closure over them."""

    def __init__(self, graph: Graph, weights: dict[str, Weight], max_batch: int):
        cfg = graph.config
        self.graph, self.weights = graph, weights
        self.bufs: dict[str, np.ndarray] = {}
        for name, spec in graph.buffers.items():
            dtype = {"f32": np.float32, "i32": np.int32, "q80": np.uint8}[spec.dtype]
            cols = spec.row_bytes if spec.dtype == "q80" else spec.width
            self.bufs[name] = np.zeros((max_batch, cols), dtype=dtype)
        n_kv = graph.slice.n_kv_heads * cfg.head_dim
        self.k_cache = [np.zeros((graph.max_seq_len, n_kv), np.float32) for _ in range(cfg.n_layers)]
        self.v_cache = [np.zeros((graph.max_seq_len, n_kv), np.float32) for _ in range(cfg.n_layers)]
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
            None if factors is None else np.ascontiguousarray(factors.data.reshape(-1), np.float32),
            graph.max_seq_len,
        )
        self.att_scratch = np.zeros((max_batch * max(graph.slice.n_heads, 1), graph.max_seq_len), np.float32)
        self.segments: list[list[Step]] = [[self._bind(op) for op in seg.ops] for seg in graph.segments]

    def pipe(self, name: str) -> np.ndarray:
        return self.bufs[name]

    def run_segment(self, index: int, n_tokens: int) -> None:
        for step in self.segments[index]:
            step(n_tokens)

    # ---- op binding: one closure per op, no lookups at run time ----
    def _bind(self, op: Op) -> Step:
        b, p = self.bufs, op.params
        w = self.weights[op.weight] if op.weight else None
        ins = [b[i] for i in op.inputs]
        outs = [b[o] for o in op.outputs]
        if op.kind == "embedding":
            tok, x = ins[0], outs[0]
            return lambda n: kernels.embedding(w.data, w.dtype, tok[:n, 0], x[:n])
        if op.kind == "rmsnorm":
            x, out, wv, eps = ins[0], outs[0], np.ascontiguousarray(w.data.reshape(-1), np.float32), p["eps"]
            return lambda n: kernels.rmsnorm(x[:n], wv, eps, out[:n])
        if op.kind == "quantize_q80":
            x, out = ins[0], outs[0]
            return lambda n: kernels.quantize_q80(x[:n], out[:n])
        if op.kind == "matmul":
            x, out = ins[0], outs[0]
            mm = kernels.matmul_q80 if x.dtype == np.uint8 else kernels.matmul
            return lambda n: mm(w.data, w.dtype, x[:n], out[:n])
        if op.kind == "rope":
            x, pos, cos, sin, hd, neox = ins[0], ins[1], self.cos, self.sin, p["head_dim"], p["neox"]
            return lambda n: kernels.rope(x[:n], pos[:n, 0], cos, sin, hd, neox)
        if op.kind == "kv_store":
            k, v, pos = ins
            kc, vc = self.k_cache[p["layer"]], self.v_cache[p["layer"]]
            return lambda n: kernels.kv_store(kc, vc, pos[:n, 0], k[:n], v[:n])
        if op.kind == "attention":
            q, pos, out = ins[0], ins[1], outs[0]
            kc, vc = self.k_cache[p["layer"]], self.v_cache[p["layer"]]
            nh, nkv, hd, scratch = p["n_heads"], p["n_kv_heads"], p["head_dim"], self.att_scratch
            return lambda n: kernels.attention(q[:n], kc, vc, pos[:n, 0], nh, nkv, hd, out[:n], scratch)
        if op.kind == "silu_mul":
            gate, up = ins
            return lambda n: kernels.silu_mul(gate[:n], up[:n])
        if op.kind == "to_pipe":
            return self._bind_to_pipe(ins[0], outs[0], p["slot"])
        if op.kind == "merge_add":
            return self._bind_merge_add(ins[0], outs[0])
        raise ValueError(f"CPU backend has no kernel for op kind {op.kind!r}")

    def _bind_to_pipe(self, y: np.ndarray, zq: np.ndarray, slot: int) -> Step:
        dim = y.shape[1]
        if zq.dtype == np.uint8:
            rb = dim // BLOCK * BLOCK_BYTES["q80"]
            dst = zq[:, slot * rb : (slot + 1) * rb]
            return lambda n: kernels.quantize_q80(y[:n], dst[:n])
        dst = zq[:, slot * dim : (slot + 1) * dim]

        def copy(n: int) -> None:
            dst[:n] = y[:n]

        return copy

    def _bind_merge_add(self, zq: np.ndarray, x: np.ndarray) -> Step:
        """x += every node's slot in node order (the same order everywhere keeps replicas bit-identical)."""
        if zq.dtype == np.uint8:
            return lambda n: kernels.merge_add_q80(x[:n], zq[:n])
        dim, n_slots = x.shape[1], self.graph.slice.n_nodes
        slots = [zq[:, s * dim : (s + 1) * dim] for s in range(n_slots)]

        def merge(n: int) -> None:
            for sl in slots:
                kernels.add(x[:n], sl[:n])

        return merge


class CpuBackend(Backend):
    """numpy + numba on this machine's cores."""

    name = "cpu"

    def __init__(self, n_threads: int | None = None):
        self.n_threads = n_threads or os.cpu_count() or 1
        kernels.set_threads(self.n_threads)
        self.description = f"CPU (numba, {self.n_threads} thread{'s' if self.n_threads > 1 else ''})"

    def compile(self, graph: Graph, weights: dict[str, Weight], max_batch: int) -> Program:
        return CpuProgram(graph, weights, max_batch)
