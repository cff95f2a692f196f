"""More nodes than KV heads: query heads are cut over up to n_heads nodes and every node computes the KV
heads its query heads read (a KV head shared by two nodes is computed by both). Same tokens as one node with
f32 sync, the float64 reference of those per-node column ranges with Q80 sync, on both backends."""

from __future__ import annotations

import json

import numpy as np
import pytest
from netutil import greedy, ref_forward_nodes
from reference import load_ref_model
from tinymodel import write_tiny_gguf

from cpu_fallback.backend import CpuBackend
from engine.errors import DllamaError
from engine.generate import generate
from engine.loader import make_backend
from engine.model_file import open_model
from engine.runner import Runner
from engine.sampler import Sampler
from engine.tokenizer import tokenizer_from_gguf

TOKENS = [5, 17, 200, 3, 99, 42, 7, 150, 11]
KV2 = dict(dim=256, hidden_dim=320, n_layers=2, n_heads=8, n_kv_heads=2, vocab=288)  # 8 q heads, groups of 4


@pytest.fixture(scope="module")
def kv2_path(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("kv2") / "kv2.gguf", wtype="q40", seed=5, **KV2)


def cluster(model, backend, act: str, workers, max_seq_len: int = 64, max_batch: int = 4) -> Runner:
    return Runner(
        model,
        backend,
        act,
        max_seq_len=max_seq_len,
        max_batch=max_batch,
        workers=[w.address for w in workers],
        split=[1.0] * (len(workers) + 1),
        log=lambda line: None,
    )


def extra_kv_copies(r: Runner) -> int:
    """KV heads computed by more than one node, counted once per extra node."""
    held = [h for sl in r.slices for h in range(*sl.kv_heads)]
    return len(held) - len(set(held))


@pytest.mark.parametrize("n_nodes", [2, 4, 5, 8])
def test_f32_sync_matches_one_node(pool, kv2_path, n_nodes):
    model, cpu = open_model(kv2_path), CpuBackend(1)
    one = Runner(model, cpu, "f32", max_seq_len=64, max_batch=4)
    want_all, want = one.forward(TOKENS, 0, "all"), greedy(one, TOKENS, 6)
    r = cluster(model, cpu, "f32", pool.get(n_nodes - 1))
    try:
        got_all, got = r.forward(TOKENS, 0, "all"), greedy(r, TOKENS, 6)
    finally:
        r.close()
    assert [sl.q_heads for sl in r.slices][-1][1] == 8
    # e.g. 5 nodes hold query heads 2+2+2+1+1, which read KV heads 0, 0, 1, 1, 1
    assert extra_kv_copies(r) == {2: 0, 4: 2, 5: 3, 8: 6}[n_nodes]
    assert np.abs(got_all - want_all).max() <= 1e-4 * np.abs(want_all).max()
    assert got == want


@pytest.mark.parametrize("n_nodes", [3, 5])
def test_q80_sync_matches_the_reference_with_per_node_columns(pool, kv2_path, n_nodes):
    """Token by token, where every node does the reference's integer Q80 block dots, rows match the reference
    to float32 rounding. That rounding (float32 here, float64 there) can still move one Q80 block scale by
    one fp16 step, which moves that row's logits by ~1% (as much as a wrong column split moves every row):
    all but one row must be exact and none beyond Q80's own noise. (A batched prefill, which multiplies
    de-quantised activations in float32, flips scales more often, on one node as on several.)"""
    ref = load_ref_model(kv2_path)
    expected = ref_forward_nodes(ref, TOKENS, n_nodes)
    r = cluster(open_model(kv2_path), CpuBackend(1), "q80", pool.get(n_nodes - 1), max_batch=1)
    try:
        got = r.forward(TOKENS, 0, "all")
    finally:
        r.close()
    row_err = np.abs(got - expected).max(axis=1) / np.abs(expected).max()
    assert (row_err <= 1e-5).sum() >= len(TOKENS) - 1 and row_err.max() <= 2e-2


@pytest.mark.parametrize("vulkan_node", ["worker", "root"])
def test_a_vulkan_node_holding_heads_inside_a_group(pool, kv2_path, vulkan_node):
    """3 nodes on 2 KV heads: query heads 3+3+2, so node 1 starts inside KV group 0; Vulkan (lavapipe in CI)
    as one of the workers or as the root gives the CPU tokens."""
    try:
        vulkan = make_backend("vulkan", None)
    except DllamaError as e:
        pytest.skip(f"no usable Vulkan device: {e}")
    model, cpu = open_model(kv2_path), CpuBackend(1)
    one = Runner(model, cpu, "f32", max_seq_len=64, max_batch=4)
    want_all, want = one.forward(TOKENS, 0, "all"), greedy(one, TOKENS, 6)
    workers = pool.get(1, backend="vulkan") + pool.get(1) if vulkan_node == "worker" else pool.get(2)
    r = cluster(model, vulkan if vulkan_node == "root" else cpu, "f32", workers)
    try:
        got_all, got = r.forward(TOKENS, 0, "all"), greedy(r, TOKENS, 6)
    finally:
        r.close()
    assert [sl.q_heads for sl in r.slices] == [(0, 3), (3, 6), (6, 8)]
    assert np.abs(got_all - want_all).max() <= 1e-4 * np.abs(want_all).max()
    assert got == want


@pytest.mark.slow
@pytest.mark.parametrize("n_nodes", [4, 5, 9])
def test_smollm2_beyond_three_nodes_matches_golden(pool, shared, smollm2_path, n_nodes):
    """SmolLM2 has 3 KV heads and 9 query heads: 4, 5 and 9 nodes give the golden logits and greedy ids."""
    meta = json.loads((shared / "smollm2_golden.json").read_text())
    npz = np.load(shared / "smollm2_golden.npz")
    model = open_model(smollm2_path)
    tok = tokenizer_from_gguf(model.metadata)
    r = cluster(model, CpuBackend(1), "f32", pool.get(n_nodes - 1), max_seq_len=128)
    try:
        assert max(sl.n_heads for sl in r.slices) == -(-9 // n_nodes)
        for case in meta["cases"]:
            i, n = case["case"], case["safe_prefix_f32"]
            prompt = list(npz[f"case{i}_prompt_ids"])
            assert np.abs(r.forward(prompt, 0) - npz[f"case{i}_last_logits"]).max() <= 1e-3
            if n:
                events = generate(r, tok, prompt, n, Sampler(tok.vocab_size, 0.0))
                assert [e.token for e in events if e.kind == "token"] == list(npz[f"case{i}_greedy_ids"][:n])
    finally:
        r.close()
