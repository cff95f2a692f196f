"""One cluster, two backends: a Vulkan node (lavapipe in CI) and a CPU node give the same tokens as one CPU
node, with the Vulkan node as worker or as root."""

from __future__ import annotations

import numpy as np
import pytest
from netutil import greedy, ref_forward_nodes
from reference import load_ref_model

from cpu_fallback.backend import CpuBackend
from engine.model_file import open_model
from engine.runner import Runner

TOKENS = [5, 17, 200, 3, 99, 42, 7, 150, 11]


@pytest.mark.parametrize("wtype, act", [("f32", "f32"), ("q40", "f32"), ("q40", "q80")])
@pytest.mark.parametrize("vulkan_node", ["worker", "root"])
def test_vulkan_and_cpu_nodes_give_the_cpu_tokens(pool, tiny8_paths, vulkan, vulkan_node, wtype, act):
    model = open_model(tiny8_paths[wtype])
    cpu = CpuBackend(1)
    one = Runner(model, cpu, act, max_seq_len=64, max_batch=4)
    want_logits, want = one.forward(TOKENS, 0, "all"), greedy(one, TOKENS, 8)
    workers = pool.get(1, backend="vulkan" if vulkan_node == "worker" else "cpu")
    m = workers[0].mark()
    r = Runner(
        model,
        vulkan if vulkan_node == "root" else cpu,
        act,
        max_seq_len=64,
        max_batch=4,
        workers=[workers[0].address],
        log=lambda line: None,
    )
    try:
        got_logits, got = r.forward(TOKENS, 0, "all"), greedy(r, TOKENS, 8)
    finally:
        r.close()
    desc = workers[0].wait_for(r"⭕ Root \S+ connected: (.*)", m).group(1)
    assert ("Vulkan" in desc) == (vulkan_node == "root")
    assert ("Vulkan" in workers[0].wait_for("Listening on", 0).string) == (vulkan_node == "worker")
    assert got == want
    tol = 1e-4  # f32 sync: as the CPU-only clusters
    if act == "q80":  # two nodes round their partial sums separately: the 2-node Q80 scheme is the yardstick
        want_logits, tol = ref_forward_nodes(load_ref_model(tiny8_paths[wtype]), TOKENS, 2), 2e-3
    assert np.abs(got_logits - want_logits).max() <= tol * np.abs(want_logits).max()
