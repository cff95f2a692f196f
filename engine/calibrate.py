"""A node's speed, for cluster splits in proportion to it: decode steps of a small random Q40 Llama (33 MB of
weights, more than a CPU cache holds) compiled and run on the node's own backend, as GB/s of weights read."""

from __future__ import annotations

import time

import numpy as np

from engine.arch import get_arch
from engine.backend import Backend
from engine.config import ModelConfig
from engine.graph import build_graph
from engine.runner import run_graph, warm_up
from engine.slicing import node_slice
from engine.weight_types import row_bytes
from engine.weights import Weight, weight_from_bytes

CALIBRATION = ModelConfig(
    arch="llama",
    dim=1024,
    hidden_dim=4096,
    n_layers=4,
    n_heads=16,
    n_kv_heads=4,
    head_dim=64,
    vocab_size=1024,
    context_len=64,
)
SECONDS = 0.3  # of timed decode steps (at least 3 of them)


def _weights(cfg: ModelConfig) -> dict[str, Weight]:
    """Q40 matrices of random nibbles with a fixed scale, norm weights of ones."""
    rng = np.random.default_rng(0)
    out = {}
    for name, spec in get_arch(cfg.arch).table(cfg):
        if spec.optional:
            continue
        shape = spec.shape(cfg)
        if len(shape) == 1:
            out[name] = weight_from_bytes(name, "f32", shape, np.ones(shape, np.float32).view(np.uint8))
            continue
        rows, cols = shape
        raw = rng.integers(0, 256, (rows, row_bytes("q40", cols)), np.uint8)
        raw[:, 0::18], raw[:, 1::18] = 0x00, 0x2C  # every block's f16 scale 1/16
        out[name] = weight_from_bytes(name, "q40", shape, raw.reshape(-1))
    out["output.weight"] = out["token_embd.weight"]
    return out


def measure_speed(backend: Backend) -> float:
    """GB/s of weights this backend reads per decoded token of the calibration model (its per-op overheads
    included, as in real decoding)."""
    cfg = CALIBRATION
    graph = build_graph(cfg, node_slice(cfg), "q80", cfg.context_len)
    weights = _weights(cfg)
    program = backend.compile(graph, weights, 1)
    warm_up(program, graph, 1)
    per_token = sum(w.nbytes for n, w in weights.items() if n != "token_embd.weight")
    steps, t0 = 0, time.perf_counter()
    while steps < 3 or time.perf_counter() - t0 < SECONDS:
        program.pipe("tok")[0, 0] = steps % cfg.vocab_size
        program.pipe("pos")[0, 0] = steps % cfg.context_len
        run_graph(program, graph.segments, 1, "last")
        steps += 1
    return per_token * steps / (time.perf_counter() - t0) / 1e9
