"""Runs a node's compiled graph over batches of tokens: the forward pass as the generator sees it."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from engine.backend import Backend, Program
from engine.errors import DllamaError
from engine.graph import Graph, Segment, Sync, build_graph
from engine.slicing import (
    KV_TYPES,
    NodeSlice,
    fit_slices,
    kv_cache_bytes,
    plan_slices,
    slice_bytes,
    slice_weights,
)
from engine.weights import Model, Weight

MAX_BATCH = 32  # prompt tokens per forward pass


@dataclass
class ForwardStats:
    """Time spent computing vs synchronising, and payload bytes moved, for one forward pass."""

    n_tokens: int = 0
    eval_s: float = 0.0
    sync_s: float = 0.0
    sent: int = 0
    recv: int = 0


def run_graph(
    program: Program,
    segments: Sequence[Segment],
    n: int,
    mode: str,
    sync: Callable[[Sync, int], None] | None = None,
) -> int:
    """Run one forward pass of `n` rows on any node, calling `sync(step, rows)` after each segment that ends
    in a network step; return the number of logits rows computed (0 for mode "none").

    With mode "last" only the last row's logits are needed: rows n-1 of `x` and `zq` move to row 0 and the
    final segment runs on one row. Every node of a cluster does the same, told the mode by the root. On one
    node a pass that needs every row's logits (a decode step) is one `run_segments` call.
    """
    last = len(segments) - 1
    if sync is None:  # one node: nothing happens between segments, so a backend may run them as one
        if mode == "all" or (mode == "last" and n == 1):  # the classifier on every row: one run (decode)
            program.run_segments(0, last + 1, n)
            return n
        program.run_segments(0, last, n)
    else:
        for index in range(last):
            program.run_segment(index, n)
            if segments[index].sync is not None:
                sync(segments[index].sync, n)
    if mode == "none":
        return 0
    rows = n
    if mode == "last" and n > 1:
        program.copy_row(("x", "zq"), n - 1, 0)
        rows = 1
    program.run_segment(last, rows)
    if sync is not None and segments[last].sync is not None:
        sync(segments[last].sync, rows)
    return rows


def weight_bytes_per_token(graph: Graph, weights: dict[str, Weight]) -> int:
    """Weight bytes a decode step of this node reads: every matrix once, of an expert stack only the
    k experts a token is routed to."""
    total = 0
    for name in {op.weight: op for op in graph.ops() if op.kind in ("matmul", "moe_matmul")}:
        w = weights[name]
        total += w.nbytes * graph.config.n_active_experts // w.experts if w.experts else w.nbytes
    return total


def warm_up(program: Program, graph: Graph, max_batch: int, networked: bool = False) -> None:
    """Run the graph once on 1 and on 2 rows without the network, so that kernel compilation and the first
    touch of every weight page happen at load rather than inside the first, timed forward pass (where cluster
    peers also time each other). `networked`: segment by segment, as a cluster node will run it. The KV rows
    it writes are overwritten by the first real tokens."""
    for n in sorted({1, min(2, max_batch)}):
        program.pipe("tok")[:n, 0] = 0
        program.pipe("pos")[:n, 0] = np.arange(n)
        run_graph(program, graph.segments, n, "all", (lambda step, rows: None) if networked else None)


class Runner:
    """Node 0 of 1 + len(workers): builds the graph for its slice, compiles it, and runs forward passes.

    With workers (HOST:PORT strings) it connects them, streams each its weight slices and synchronises with
    them after every segment; `close()` (also on errors) releases them for the next root.
    """

    def __init__(
        self,
        model: Model,
        backend: Backend,
        act: str = "f32",
        max_seq_len: int | None = None,
        max_batch: int = MAX_BATCH,
        workers: Sequence[str] = (),
        net_timeout: float | None = None,
        log: Callable[[str], None] = print,
        split: Sequence[float] | str | None = None,
        kv_type: str = "f32",
        n_slots: int = 1,
    ):
        cfg = model.config
        if kv_type not in KV_TYPES:
            raise DllamaError(f"unknown --kv-cache-type {kv_type!r}: choose one of {', '.join(KV_TYPES)}")
        if not 1 <= n_slots <= max_batch:
            raise DllamaError(f"--parallel must be 1..{max_batch} (got {n_slots})")
        self.model, self.backend, self.act, self.max_batch = model, backend, act, max_batch
        self.kv_type, self.n_slots = kv_type, n_slots
        self.max_seq_len = min(cfg.context_len, max_seq_len or 4096)
        self.n_nodes = 1 + len(workers)
        if split is not None and split != "auto" and len(split) != self.n_nodes:
            what = "give --workers too" if not workers else f"the cluster has {self.n_nodes} nodes"
            raise DllamaError(f"--split gives {len(split)} weights: {what} (one weight per node, root first)")
        self.slices = plan_slices(model, self.n_nodes)  # too many nodes: refused before any connection
        self.split_table: list[dict] = []  # a cluster's start-up table: one row per node
        self.cluster = None
        if workers:
            from net.protocol import NET_TIMEOUT
            from net.root import RootCluster

            self.cluster = RootCluster(
                model,
                lambda caps: self._plan(caps, split, log),
                workers,
                act,
                self.max_seq_len,
                max_batch,
                backend,
                net_timeout or NET_TIMEOUT,
                log,
                kv_type,
                n_slots,
            )
        self.slice = self.slices[0]
        if n_slots > 1 and backend.name == "cpu":  # a Vulkan program checks its device memory itself
            from net.protocol import available_memory

            need = kv_cache_bytes(cfg, self.slice, n_slots * self.max_seq_len, kv_type)
            free = available_memory()
            if free and need > free:
                raise DllamaError(
                    f"--parallel {n_slots} needs {need / 1e6:.0f} MB of KV cache ({n_slots} x --max-seq-len "
                    f"{self.max_seq_len}) but {free / 1e6:.0f} MB are free: lower --parallel or --max-seq-len"
                )
        self.graph = build_graph(cfg, self.slice, act, self.max_seq_len, kv_type, n_slots)
        try:
            weights = slice_weights(model, self.slice)
            self.program = backend.compile(self.graph, weights, max_batch)
            warm_up(self.program, self.graph, max_batch, networked=self.cluster is not None)
            if self.cluster is not None:
                self.cluster.start(self.program, self.graph)
        except BaseException:
            self.close()
            raise
        self.weight_bytes_per_token = weight_bytes_per_token(self.graph, weights)
        self.vocab_size = cfg.vocab_size

    def _plan(
        self, caps: list[dict], split: Sequence[float] | str | None, log: Callable[[str], None]
    ) -> list[NodeSlice]:
        """Every node's slice, once the workers have said what they are: evenly (None), in proportion to each
        node's measured speed ("auto") or to `split`, within each node's free memory; logged as a table."""
        from engine.calibrate import measure_speed
        from net.protocol import available_memory, printable, reported

        memory, speeds = zip(*map(reported, caps), strict=True) if caps else ((), ())
        if split == "auto" and None not in speeds:
            measured = [measure_speed(self.backend), *speeds]
            # shares in quarters of the fastest, so that calibration noise neither splits equal nodes unevenly
            # nor moves the cut between runs (a moved cut would miss the workers' slice caches)
            weights = [max(1, round(4 * v / max(measured))) / 4 for v in measured]
            how = "by measured speed (" + ", ".join(f"{v:.2f}" for v in measured) + " GB/s)"
        elif split == "auto":
            weights, how = [1.0] * self.n_nodes, "evenly (a worker reported no speed)"
        elif split is not None:
            weights, how = list(split), "by --split"
        else:
            weights, how = [1.0] * self.n_nodes, "evenly"
        memory = [available_memory(), *memory]
        names = ["the root"] + [f"worker {k}" for k in range(1, self.n_nodes)]
        kv_rows = self.n_slots * self.max_seq_len  # every slot's KV cache
        # in host memory on a CPU node; a Vulkan program checks its cache against device memory
        backends = [self.backend.name] + [c.get("backend") for c in caps]
        host_kv = [kv_rows if b == "cpu" else 0 for b in backends]
        self.slices = fit_slices(self.model, weights, memory, host_kv, names, self.kv_type)
        devices = [self.backend.description] + [str(c.get("device", "?")) for c in caps]
        self.split_table = [
            {
                "node": sl.node,
                "device": printable(dev, 60),
                "weight": round(w, 3),
                "heads": list(sl.q_heads),
                "kv_heads": list(sl.kv_heads),
                "ffn_rows": list(sl.ffn if self.model.config.hidden_dim else sl.moe),
                "vocab_rows": list(sl.vocab),
                "bytes": slice_bytes(self.model, sl, kv_rows, self.kv_type),
            }
            for sl, dev, w in zip(self.slices, devices, weights, strict=True)
        ]
        log(f"🧮 Split {how}:")
        log(
            f"   {'node':<5}{'device':<34}{'weight':>8}  {'heads':<8}"
            f"{'KV heads':<10}{'FFN rows':<14}{'MB':>9}"
        )
        for row in self.split_table:
            q, kv, ffn = row["heads"], row["kv_heads"], row["ffn_rows"]
            log(
                f"   {row['node']:<5}{row['device'][:33]:<34}{row['weight']:>8.2f}  {f'{q[0]}-{q[1]}':<8}"
                f"{f'{kv[0]}-{kv[1]}':<10}{f'{ffn[0]}-{ffn[1]}':<14}{row['bytes'] / 1e6:>9.1f}"
            )
        return self.slices

    def close(self) -> None:
        """Send the workers home (they free their slices and wait for the next root); idempotent."""
        if self.cluster is not None:
            self.cluster.close()

    def forward(
        self,
        tokens: Sequence[int],
        start_pos: int,
        logits: str = "last",
        stats: ForwardStats | None = None,
        slot: int = 0,
    ) -> np.ndarray | None:
        """Run any number of tokens of KV slot `slot` from `start_pos`; return the last token's logits
        (vocab,), every token's (n, vocab) with logits="all", or nothing with logits="none" (prefill)."""
        out = []
        for i in range(0, len(tokens), self.max_batch):
            chunk = tokens[i : i + self.max_batch]
            is_last = i + self.max_batch >= len(tokens)
            mode = "all" if logits == "all" else (logits if is_last else "none")
            positions = np.arange(start_pos + i, start_pos + i + len(chunk))
            out.append(self._forward_batch(chunk, positions, [slot] * len(chunk), mode, stats))
        if logits == "all":
            return np.concatenate(out)
        return None if logits == "none" else out[-1][0]

    def forward_rows(
        self,
        tokens: Sequence[int],
        positions: Sequence[int],
        slots: Sequence[int],
        stats: ForwardStats | None = None,
    ) -> np.ndarray:
        """One forward pass of up to max_batch rows, each its own token, position and KV slot (a batched
        decode step); returns every row's logits (n, vocab)."""
        if not 1 <= len(tokens) <= self.max_batch or not len(tokens) == len(positions) == len(slots):
            raise DllamaError(f"forward_rows takes 1..{self.max_batch} rows of token, position and slot")
        logits = self._forward_batch(tokens, np.asarray(positions), slots, "all", stats)
        assert logits is not None
        return logits

    def _forward_batch(
        self,
        tokens: Sequence[int],
        positions: np.ndarray,
        slots: Sequence[int],
        mode: str,
        stats: ForwardStats | None,
    ) -> np.ndarray | None:
        n = len(tokens)
        if n and (positions.min() < 0 or positions.max() >= self.max_seq_len):
            raise DllamaError(
                f"the context is full: {positions.max() + 1} tokens do not fit in --max-seq-len "
                f"{self.max_seq_len}"
            )
        if any(not 0 <= s < self.n_slots for s in slots):
            raise DllamaError(f"a KV slot outside 0..{self.n_slots - 1}")
        p, net = self.program, self.cluster
        p.pipe("tok")[:n, 0] = tokens
        p.pipe("pos")[:n, 0] = positions
        if self.n_slots > 1:
            p.pipe("slot")[:n, 0] = slots
        t0 = time.perf_counter()
        if net is None:
            rows = run_graph(p, self.graph.segments, n, mode)
            logits = p.pipe("logits")[:rows].copy() if rows else None
            sync_s, sent, recv = 0.0, 0, 0
        else:
            sync0, sent0, recv0 = net.totals()
            with net.forward(positions, slots, mode):
                rows = run_graph(p, self.graph.segments, n, mode, net.sync)
            logits = net.logits(rows) if rows else None
            sync1, sent1, recv1 = net.totals()
            sync_s, sent, recv = sync1 - sync0, sent1 - sent0, recv1 - recv0
        if stats is not None:
            stats.n_tokens += n
            stats.eval_s += time.perf_counter() - t0 - sync_s
            stats.sync_s += sync_s
            stats.sent += sent
            stats.recv += recv
        return logits
