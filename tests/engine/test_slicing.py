"""Tensor-parallel slicing rules (spec 4.9) on uneven splits."""

from __future__ import annotations

import pytest

from engine.config import ModelConfig
from engine.errors import DllamaError
from engine.slicing import node_slice, split

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


def test_more_nodes_than_kv_heads_is_refused():
    with pytest.raises(DllamaError, match="at most 3 nodes"):
        node_slice(CFG, 0, 4)
