"""Runs a node's compiled graph over batches of tokens: the forward pass as the generator sees it."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from engine.backend import Backend
from engine.errors import DllamaError
from engine.graph import build_graph
from engine.slicing import node_slice, slice_weights
from engine.weights import Model

MAX_BATCH = 32  # prompt tokens per forward pass


@dataclass
class ForwardStats:
    """Time spent computing vs synchronising, and payload bytes moved, for one forward pass."""

    n_tokens: int = 0
    eval_s: float = 0.0
    sync_s: float = 0.0
    sent: int = 0
    recv: int = 0


class Runner:
    """Node 0's view of the model: builds the graph for its slice, compiles it, and runs forward passes."""

    def __init__(
        self,
        model: Model,
        backend: Backend,
        act: str = "f32",
        max_seq_len: int | None = None,
        max_batch: int = MAX_BATCH,
    ):
        cfg = model.config
        self.model, self.backend, self.act, self.max_batch = model, backend, act, max_batch
        self.max_seq_len = min(cfg.context_len, max_seq_len or 4096)
        self.slice = node_slice(cfg, 0, 1)
        self.graph = build_graph(cfg, self.slice, act, self.max_seq_len)
        weights = slice_weights(model, self.slice)
        self.program = backend.compile(self.graph, weights, max_batch)
        used = {op.weight for op in self.graph.ops() if op.kind == "matmul"}
        self.weight_bytes_per_token = sum(weights[name].nbytes for name in used)
        self.vocab_size = cfg.vocab_size

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
        p = self.program
        p.pipe("tok")[:n, 0] = tokens
        p.pipe("pos")[:n, 0] = np.arange(start_pos, start_pos + n)
        t0 = time.perf_counter()
        last = len(self.graph.segments) - 1
        for index in range(last):
            p.run_segment(index, n)
        logits = None
        if mode != "none":
            rows = n
            if mode == "last" and n > 1:  # only the last token's logits are needed: move its row first
                for name in ("x", "zq"):
                    p.pipe(name)[0] = p.pipe(name)[n - 1]
                rows = 1
            p.run_segment(last, rows)
            logits = p.pipe("logits")[:rows].copy()
        if stats is not None:
            stats.n_tokens += n
            stats.eval_s += time.perf_counter() - t0
        return logits
