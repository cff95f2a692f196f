"""Tensor-parallel slicing rules (spec 4.9) on uneven splits."""

from __future__ import annotations

import pytest
from tinymodel import write_tiny_gguf

from engine.config import ModelConfig
from engine.errors import DllamaError
from engine.model_file import open_model
from engine.slicing import fit_slices, node_slice, plan_slices, shares, slice_bytes, slice_weights, split

TINY8 = dict(dim=256, hidden_dim=320, n_layers=2, n_heads=8, n_kv_heads=8, vocab=288)

CFG = ModelConfig(
    "llama",
    dim=576,
    hidden_dim=1536,
    n_layers=1,
    n_heads=9,
    n_kv_heads=3,
    head_dim=64,
    vocab_size=49152,
    context_len=8192,
)


def test_split_covers_everything_once():
    for total in (1, 7, 48, 49152):
        for n in (1, 2, 3, 5):
            ranges = [split(total, n, i) for i in range(n)]
            assert ranges[0][0] == 0 and ranges[-1][1] == total
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
            sizes = [e - s for s, e in ranges]
            assert max(sizes) - min(sizes) <= 1


def test_two_nodes_on_three_kv_heads_keep_whole_gqa_groups():
    s0, s1 = node_slice(CFG, 0, 2), node_slice(CFG, 1, 2)
    assert (s0.kv_heads, s1.kv_heads) == ((0, 2), (2, 3))
    assert (s0.q_heads, s1.q_heads) == ((0, 6), (6, 9))  # 3 query heads per KV head
    assert s0.ffn[1] % 32 == 0 and s0.ffn[1] == s1.ffn[0] and s1.ffn[1] == 1536
    assert s0.vocab[1] == s1.vocab[0] and s1.vocab[1] == 49152


@pytest.mark.parametrize("n_nodes", [4, 5, 7, 9])
def test_more_nodes_than_kv_heads_cut_query_heads_and_read_every_kv_head_they_need(n_nodes):
    """Beyond 3 nodes SmolLM2's 9 query heads are cut one by one; each node's KV heads are exactly the groups
    its query heads fall in (so a KV head may be held by two nodes), and its offset places its first head."""
    slices = [node_slice(CFG, k, n_nodes) for k in range(n_nodes)]
    assert [s.q_heads for s in slices] == [split(9, n_nodes, k) for k in range(n_nodes)]
    for s in slices:
        groups = {h // 3 for h in range(*s.q_heads)}
        assert s.kv_heads == (min(groups), max(groups) + 1)
        assert all(
            (s.q_offset(3) + h) // 3 + s.kv_heads[0] == (s.q_heads[0] + h) // 3 for h in range(s.n_heads)
        )
    assert slices[-1].ffn[1] == 1536 and slices[-1].vocab[1] == 49152


def test_more_nodes_than_query_heads_is_refused():
    with pytest.raises(
        DllamaError, match="10 nodes cannot share a model with 9 attention heads: use at most 9"
    ):
        node_slice(CFG, 0, 10)


def test_head_cuts_keep_the_output_projections_blocks_whole(tmp_path):
    """With Q4_K (256-value super-blocks) and head_dim 32, query heads beyond the KV count are cut in runs of
    8 (so each node's columns of attn_output are whole super-blocks), and a third node is refused."""
    path = write_tiny_gguf(
        tmp_path / "k.gguf", wtype="q4k", dim=512, hidden_dim=512, n_heads=16, n_kv_heads=1
    )
    model = open_model(path)
    assert model.weights["blk.0.attn_output.weight"].dtype == "q4k"
    slices = plan_slices(model, 2)
    assert [(s.q_heads, s.kv_heads) for s in slices] == [((0, 8), (0, 1)), ((8, 16), (0, 1))]
    assert all(w.cols == 256 for w in (slice_weights(model, s)["blk.0.attn_output.weight"] for s in slices))
    with pytest.raises(DllamaError, match="16 attention heads \\(cut in runs of 8 .*at most 2 nodes"):
        plan_slices(model, 3)


@pytest.mark.parametrize("weights", [[3, 1], [1, 3], [2, 1, 1], [5, 1, 1, 1], [1.5, 1.0]])
def test_weighted_shares_follow_the_weights_within_one_unit(weights):
    assert [b - a for a, b in shares(len(weights), weights)] == [1] * len(weights)  # one unit each at least
    for total in (10, 48, 49152):
        ranges = shares(total, weights)
        assert ranges[0][0] == 0 and ranges[-1][1] == total
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
        for (a, b), w in zip(ranges, weights, strict=True):
            assert b - a >= 1 and abs((b - a) - total * w / sum(weights)) < 1


def test_equal_weights_are_the_even_split():
    for total in (3, 10, 49152):
        assert shares(total, [2.0] * 3) == [split(total, 3, k) for k in range(3)]


def test_a_node_three_times_as_fast_gets_three_quarters():
    cfg = ModelConfig(**{**CFG.__dict__, "n_heads": 8, "n_kv_heads": 8})  # 8 KV heads, 48 FFN blocks
    s0, s1 = (node_slice(cfg, k, 2, weights=[3, 1]) for k in range(2))
    assert (s0.kv_heads, s1.kv_heads) == ((0, 6), (6, 8))
    assert s0.ffn == (0, 36 * 32) and s1.ffn == (36 * 32, 1536)
    assert s0.vocab == (0, 36864) and s1.vocab == (36864, 49152)
    with pytest.raises(DllamaError, match="2 positive weights"):
        node_slice(cfg, 0, 2, weights=[1, 0])


def test_memory_caps_a_node_share_and_a_model_that_cannot_fit_is_refused(tmp_path):
    model = open_model(write_tiny_gguf(tmp_path / "m.gguf", wtype="f32", seed=1, **TINY8))
    even = plan_slices(model, 2)
    need = [slice_bytes(model, sl, 64) for sl in even]
    names = ["the root", "worker 1"]
    assert fit_slices(model, [1, 1], [0, 0], [64, 64], names) == even  # unknown memory: no cap
    short = fit_slices(model, [1, 1], [0, int(need[1] * 0.7)], [64, 64], names)
    assert slice_bytes(model, short[1], 64) <= need[1] * 0.7 < need[1]
    assert short[1].ffn[1] - short[1].ffn[0] < even[1].ffn[1] - even[1].ffn[0]
    with pytest.raises(DllamaError, match="does not fit: worker 1 needs .* GB for its slice and KV cache"):
        fit_slices(model, [1, 1], [0, 1000], [64, 64], names)
    held = slice_bytes(model, even[1], 0)  # a Vulkan node: its KV cache is on the device, not in this memory
    assert fit_slices(model, [1, 1], [0, held], [64, 0], names) == even
    with pytest.raises(DllamaError, match=r"does not fit: worker 1 needs .* GB for its slice but has"):
        fit_slices(model, [1, 1], [0, 1000], [64, 0], names)


def test_slice_bytes_counts_every_held_tensor_and_the_kv_cache(tmp_path):
    model = open_model(write_tiny_gguf(tmp_path / "m.gguf", wtype="q40", seed=1, **TINY8))
    sl = plan_slices(model, 2)[1]
    weights = {n: w for n, w in slice_weights(model, sl).items() if n != "token_embd.weight"}
    cfg = model.config
    kv = 2 * cfg.n_layers * 64 * sl.n_kv_heads * cfg.head_dim * 4
    assert slice_bytes(model, sl, 64) == sum(w.nbytes for w in weights.values()) + kv
