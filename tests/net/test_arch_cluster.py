"""Clusters of the other architectures (qwen2, qwen3, qwen3moe; GGUF with K-quant FFNs and .m files) on 2
and 4 nodes against the float64 reference: the FFN rows of a K-quant down matrix are cut on 256-value
super-blocks, unevenly where the count does not divide."""

from __future__ import annotations

import numpy as np
import pytest
from forward_checks import TOKENS, assert_matches
from netutil import greedy, ref_forward_nodes
from reference import load_ref_model, ref_forward
from tinymodel import write_tiny_gguf, write_tiny_m

from engine.model_file import open_model
from engine.runner import Runner

# 4 KV heads (so 4 nodes work); 5 FFN super-blocks: 2 nodes take 768 + 512 rows, 4 nodes 512 + 3 x 256
BASE = dict(dim=128, hidden_dim=1280, n_layers=2, n_heads=8, n_kv_heads=4, vocab=288)
GGUF = {
    "qwen2": dict(arch="qwen2", types={"ffn_down": "q6k", "attn_v": "q80"}),
    "qwen3": dict(arch="qwen3", head_dim=32, types={"ffn_down": "q4k"}),
    "qwen3moe": dict(
        arch="qwen3moe",
        head_dim=32,
        n_experts=4,
        n_active_experts=2,
        moe_hidden_dim=1024,
        types={"ffn_down_exps": "q5k"},
    ),
}
M_FILES = {  # .m weight types have 32-value blocks
    "qwen3": dict(arch="qwen3", head_dim=32, wtype="q40"),
    "qwen3moe": dict(
        arch="qwen3moe", head_dim=32, n_experts=4, n_active_experts=2, moe_hidden_dim=160, wtype="q80"
    ),
}


def cluster(model, backend, act: str, workers) -> Runner:
    return Runner(
        model,
        backend,
        act,
        max_seq_len=64,
        max_batch=4,
        workers=[w.address for w in workers],
        log=lambda line: None,
    )


@pytest.mark.parametrize("n_nodes", [2, 4])
@pytest.mark.parametrize("arch", sorted(GGUF))
def test_gguf_clusters_match_the_reference(pool, tmp_path, backend, arch, n_nodes):
    path = write_tiny_gguf(tmp_path / f"{arch}.gguf", wtype="q50", seed=4, **BASE, **GGUF[arch])
    model, ref = open_model(path), load_ref_model(path)
    one = Runner(model, backend, "f32", max_seq_len=64, max_batch=4)
    r = cluster(model, backend, "f32", pool.get(n_nodes - 1))
    try:
        got = r.forward(TOKENS, 0, "all")
        tokens = greedy(r, TOKENS, 5)
        cuts = [s.moe if arch == "qwen3moe" else s.ffn for s in r.slices]
    finally:
        r.close()
    assert_matches(got, ref_forward(ref, TOKENS))
    assert tokens == greedy(one, TOKENS, 5)
    assert [b - a for a, b in cuts] == CUTS[arch == "qwen3moe", n_nodes]


CUTS = {  # FFN rows per node, in whole 256-value super-blocks: 1280 dense rows, 1024 rows per expert
    (False, 2): [768, 512],
    (False, 4): [512, 256, 256, 256],
    (True, 2): [512, 512],
    (True, 4): [256, 256, 256, 256],
}


@pytest.mark.parametrize("n_nodes", [2, 4])
@pytest.mark.parametrize("arch", sorted(M_FILES))
def test_m_file_clusters_match_the_reference(pool, tmp_path, backend, arch, n_nodes):
    tm = write_tiny_m(tmp_path / f"{arch}.m", seed=6, **{**BASE, "hidden_dim": 160}, **M_FILES[arch])
    r = cluster(open_model(tm.path), backend, "f32", pool.get(n_nodes - 1))
    try:
        got = r.forward(TOKENS, 0, "all")
    finally:
        r.close()
    assert_matches(got, ref_forward(tm.ref_model(), TOKENS))


def test_moe_cluster_with_q80_sync(pool, tmp_path, backend):
    """Q80 partial sums over 4 nodes against the reference of exactly that scheme (256-row expert cuts)."""
    path = write_tiny_gguf(tmp_path / "moe.gguf", wtype="q50", seed=4, **BASE, **GGUF["qwen3moe"])
    ref = load_ref_model(path)
    expected = ref_forward_nodes(ref, TOKENS, 4, unit=256)
    r = cluster(open_model(path), backend, "q80", pool.get(3))
    try:
        got = r.forward(TOKENS, 0, "all")
    finally:
        r.close()
    err = np.abs(got - expected).max()
    assert err <= 2e-3 * np.abs(expected).max()
    assert err < np.abs(ref_forward(ref, TOKENS, q80=True) - expected).max() / 2
