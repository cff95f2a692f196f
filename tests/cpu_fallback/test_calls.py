"""Regression guard that times nothing: compiled-kernel launches per decoded token on a tiny model, against
bounds derived from the graph (per-call overhead and thread wake-ups, not bandwidth, limit small models)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from numba.core.registry import CPUDispatcher
from tinymodel import write_tiny_gguf

from cpu_fallback import kernels as K
from cpu_fallback.backend import CpuBackend
from engine.model_file import open_model
from engine.runner import Runner

N_LAYERS = 3


class Counted:
    """A compiled kernel that counts its calls (parallel ones apart) before running."""

    def __init__(self, kernel: CPUDispatcher, counts: Counter, name: str):
        self.kernel, self.counts, self.name = kernel, counts, name
        self.parallel = bool(kernel.targetoptions.get("parallel"))

    def __call__(self, *args):
        self.counts["launches"] += 1
        self.counts["parallel"] += self.parallel
        self.counts[self.name] += 1
        return self.kernel(*args)


def count_kernels(monkeypatch: pytest.MonkeyPatch) -> Counter:
    """Route every kernel the Python side calls (cached dispatchers, also those in the per-type tables)
    through Counted; helpers compiled into kernels are untouched."""
    counts: Counter = Counter()
    for name, obj in list(vars(K).items()):
        if isinstance(obj, CPUDispatcher) and type(obj._cache).__name__ != "NullCache":
            monkeypatch.setattr(K, name, Counted(obj, counts, name))
        elif isinstance(obj, dict) and obj and all(isinstance(v, CPUDispatcher) for v in obj.values()):
            for key, kernel in obj.items():
                monkeypatch.setitem(obj, key, Counted(kernel, counts, f"{name}[{key}]"))
    return counts


def runs(ops: list, kinds: tuple[str, ...]) -> int:
    """How many times the op kinds follow each other in that order in the op list."""
    n = len(kinds)
    return sum(tuple(op.kind for op in ops[i : i + n]) == kinds for i in range(len(ops) - n + 1))


@pytest.mark.parametrize("act", ["q80", "f32"])
def test_kernel_launches_per_decoded_token(tmp_path, monkeypatch, act):
    counts = count_kernels(monkeypatch)
    path = write_tiny_gguf(tmp_path / "m.gguf", wtype="q40", n_layers=N_LAYERS, seed=3)
    runner = Runner(open_model(path), CpuBackend(2), act, max_seq_len=64)
    ops = runner.graph.ops()
    kinds = Counter(op.kind for op in ops)
    runner.forward([5, 6, 7], 0)
    counts.clear()
    runner.forward([8], 3)
    # one launch per op, except: the three q/k/v matmuls are one launch and gate/up another (3 fewer per
    # layer); a norm or the gating followed by the Q80 quantisation of its output is one launch, and so are
    # the two ropes and the KV store; on one f32 node to_pipe adds into x and its merge_add is no launch
    assert kinds["matmul"] == 7 * N_LAYERS + 1 and kinds["to_pipe"] == kinds["merge_add"] == 2 * N_LAYERS
    fused = 3 * N_LAYERS + runs(ops, ("rmsnorm", "quantize_q80")) + runs(ops, ("silu_mul", "quantize_q80"))
    fused += 2 * runs(ops, ("rope", "rope", "kv_store"))
    assert runs(ops, ("rope", "rope", "kv_store")) == N_LAYERS
    assert runs(ops, ("rmsnorm", "quantize_q80")) == (2 * N_LAYERS + 1 if act == "q80" else 0)
    assert counts["launches"] == len(ops) - kinds["merge_add"] - fused, counts
    # parallel regions: the matmul launches and attention (kept parallel so the helper threads stay awake)
    assert counts["parallel"] == kinds["matmul"] - 3 * N_LAYERS + kinds["attention"], counts


@pytest.mark.parametrize("act", ["q80", "f32"])
def test_fused_launches_compute_what_the_ops_do_one_by_one(tmp_path, monkeypatch, act):
    """The fused runs and the single node's add at to_pipe give bit-identical logits to the ops one by one
    (prefill and decode)."""
    from cpu_fallback import backend as B

    path = write_tiny_gguf(tmp_path / "m.gguf", wtype="q40", n_layers=N_LAYERS, seed=5)

    def logits() -> list:
        runner = Runner(open_model(path), CpuBackend(1), act, max_seq_len=64)
        return [runner.forward([5, 6, 7], 0), runner.forward([8], 3), runner.forward([9], 4)]

    fused = logits()
    with monkeypatch.context() as m:
        m.setattr(B, "FUSIONS", ())
        m.setattr(B.CpuProgram, "_single_f32_node", property(lambda self: False))
        plain = logits()
    for a, b in zip(fused, plain, strict=True):
        assert np.array_equal(a, b)
