"""Qwen2.5-Coder-0.5B (2 KV heads) on 2 nodes: its 4864 FFN rows (19 Q4_K/Q6_K super-blocks of the down
matrices) cut unevenly on super-blocks as 2560 + 2304; a CPU or a Vulkan worker gives the 1-node greedy tokens
in f32 mode."""

from __future__ import annotations

import pytest
from netutil import greedy

from cpu_fallback.backend import CpuBackend
from engine.model_file import open_model
from engine.runner import Runner

pytestmark = pytest.mark.slow
STEPS = 8


@pytest.fixture(scope="module")
def qwen25(qwen25_path):
    return open_model(qwen25_path)


@pytest.fixture(scope="module")
def one_node_tokens(qwen25, qwen25_golden):
    """Greedy tokens of both golden prompts on one CPU node."""
    _, npz = qwen25_golden
    runner = Runner(qwen25, CpuBackend(2), "f32", max_seq_len=128)
    return {i: greedy(runner, list(npz[f"case{i}_prompt_ids"]), STEPS) for i in (0, 1)}


@pytest.mark.parametrize("worker_backend", ["cpu", "vulkan"])
def test_two_nodes_give_the_one_node_tokens(pool, qwen25, qwen25_golden, one_node_tokens, worker_backend):
    _, npz = qwen25_golden
    (w,) = pool.get(1, backend=worker_backend)
    m = w.mark()
    r = Runner(qwen25, CpuBackend(1), "f32", max_seq_len=128, workers=[w.address], log=lambda line: None)
    try:
        got = {i: greedy(r, list(npz[f"case{i}_prompt_ids"]), STEPS) for i in (0, 1)}
    finally:
        r.close()
    assert [s.ffn for s in r.slices] == [(0, 2560), (2560, 4864)]
    assert [s.kv_heads for s in r.slices] == [(0, 1), (1, 2)]
    assert ("Vulkan" in w.wait_for("Listening on", 0).string) == (worker_backend == "vulkan")
    w.wait_for("Node 1 of 2: qwen2", m)
    assert got == one_node_tokens
