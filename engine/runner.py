"""Runs a node's compiled graph over batches of tokens: the forward pass as the generator sees it."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from engine.backend import Backend, Program
from engine.errors import DllamaError
from engine.graph import Graph, Segment, Sync, build_graph
from engine.slicing import plan_slices, slice_weights
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
    final segment runs on one row. Every node of a cluster does the same, told the mode by the root.
    """
    last = len(segments) - 1
    if sync is None:  # one node: nothing happens between segments, so a backend may run them as one
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
        for name in ("x", "zq"):
            program.pipe(name)[0] = program.pipe(name)[n - 1]
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
    ):
        cfg = model.config
        self.model, self.backend, self.act, self.max_batch = model, backend, act, max_batch
        self.max_seq_len = min(cfg.context_len, max_seq_len or 4096)
        self.n_nodes = 1 + len(workers)
        self.slices = plan_slices(model, self.n_nodes)  # too many nodes: refused before any connection
        self.slice = self.slices[0]
        self.graph = build_graph(cfg, self.slice, act, self.max_seq_len)
        self.cluster = None
        if workers:
            from net.protocol import NET_TIMEOUT
            from net.root import RootCluster

            self.cluster = RootCluster(
                model,
                self.slices,
                workers,
                act,
                self.max_seq_len,
                max_batch,
                backend,
                net_timeout or NET_TIMEOUT,
                log,
            )
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

    def close(self) -> None:
        """Send the workers home (they free their slices and wait for the next root); idempotent."""
        if self.cluster is not None:
            self.cluster.close()

    def forward(
        self, tokens: Sequence[int], start_pos: int, logits: str = "last", stats: ForwardStats | None = None
    ) -> np.ndarray | None:
        """Run any number of tokens from `start_pos`; return the last token's logits (vocab,), every token's
        (n, vocab) with logits="all", or nothing with logits="none" (prefill of a chunk)."""
        out = []
        for i in range(0, len(tokens), self.max_batch):
            chunk = tokens[i : i + self.max_batch]
            is_last = i + self.max_batch >= len(tokens)
            mode = "all" if logits == "all" else (logits if is_last else "none")
            out.append(self._forward_batch(chunk, start_pos + i, mode, stats))
        if logits == "all":
            return np.concatenate(out)
        return None if logits == "none" else out[-1][0]

    def _forward_batch(
        self, tokens: Sequence[int], start_pos: int, mode: str, stats: ForwardStats | None
    ) -> np.ndarray | None:
        n = len(tokens)
        if start_pos + n > self.max_seq_len:
            raise DllamaError(
                f"the context is full: {start_pos + n} tokens do not fit in --max-seq-len {self.max_seq_len}"
            )
        p, net = self.program, self.cluster
        p.pipe("tok")[:n, 0] = tokens
        p.pipe("pos")[:n, 0] = np.arange(start_pos, start_pos + n)
        t0 = time.perf_counter()
        if net is None:
            rows = run_graph(p, self.graph.segments, n, mode)
            logits = p.pipe("logits")[:rows].copy() if rows else None
            sync_s, sent, recv = 0.0, 0, 0
        else:
            sync0, sent0, recv0 = net.totals()
            with net.forward(start_pos, n, mode):
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
