"""Regression guard that times nothing: compiled-kernel launches per decoded token on a tiny model, against
bounds derived from the graph (per-call overhead and thread wake-ups, not bandwidth, limit small models)."""

from __future__ import annotations

from collections import Counter

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
    # one launch per op, except: to_pipe of a single f32 node is a numpy copy; the three q/k/v matmuls are
    # one launch and gate/up another (3 fewer per layer)
    fused = 3 * N_LAYERS
    assert kinds["matmul"] == 7 * N_LAYERS + 1 and kinds["to_pipe"] == 2 * N_LAYERS
    assert counts["launches"] <= len(ops) - kinds["to_pipe"] - fused, counts
    # parallel regions (thread wake-ups): the matmul launches only, plus nothing at these positions
    assert counts["parallel"] <= kinds["matmul"] - fused, counts
    # and the count is real: every matmul launch went through a counted kernel
    assert counts["parallel"] >= 4 * N_LAYERS + 1, counts
