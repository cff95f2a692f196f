"""Q5_0, Q5_1, Q4_K, Q5_K and Q6_K weights in the matmul and embedding shaders, against float64 products of
gguf-py's own de-quantisation (an independent decoder) on random blocks."""

from __future__ import annotations

import numpy as np
import pytest
from blocks import decode, random_weight, within
from vk_harness import Ops, config

from engine.graph import BufferSpec, Op
from engine.weights import Weight
from shaders.weights import matrix_parts

NEW_TYPES = ["q50", "q51", "q4k", "q5k", "q6k"]
# 768 = 3 super-blocks (an odd count: Q6_K's scale words are padded); 1056 = 33 blocks (Q5_0's padded too)
COLS = {"q50": 1056, "q51": 1056, "q4k": 768, "q5k": 768, "q6k": 768}


def test_parts_keep_the_total_size():
    """Upload packing splits blocks into aligned arrays of the same total size, plus one padding half per
    row where a lone fp16 scale per block meets an odd block count (hand-computed bytes per row)."""
    row_bytes = {"q50": 33 * 22 + 2, "q51": 33 * 24, "q4k": 3 * 144, "q5k": 3 * 176, "q6k": 3 * 210 + 2}
    rng = np.random.default_rng(0)
    for wtype in NEW_TYPES:
        w = Weight("m", wtype, 5, COLS[wtype], random_weight(wtype, 5, COLS[wtype], rng))
        parts = matrix_parts(w)
        assert sum(p.words * 4 for p in parts) == 5 * row_bytes[wtype], wtype
        assert parts[0].row_words * 4 % 16 == 0, wtype  # the quantised values load as whole uvec4


@pytest.mark.parametrize("act", ["f32", "q80"])
@pytest.mark.parametrize("wtype", NEW_TYPES)
def test_matmul(any_vk, wtype, act):
    """f32 and Q80 activations, in the device's tuning, the GPU split and its shared-memory variant."""
    rng = np.random.default_rng(1)
    rows, cols = 37, COLS[wtype]  # 37 rows: not a multiple of any row group
    w = Weight("blk.0.attn_q.weight", wtype, rows, cols, random_weight(wtype, rows, cols, rng))
    wf = decode(w.data, wtype)
    xin = "h_q" if act == "q80" else "h"
    ops = Ops(
        any_vk,
        [Op("matmul", "mm", (xin,), ("q",), w.name)],
        {xin: BufferSpec(cols, act), "q": BufferSpec(rows)},
        {w.name: w},
        act=act,
    )
    for n in (1, 7):
        x = rng.standard_normal((n, cols)).astype(np.float32)
        x64 = ops.write_activations(xin, x, act)
        ops.run(n)
        within(ops.read("q")[:n], x64 @ wf.T, np.abs(x64) @ np.abs(wf).T)


@pytest.mark.parametrize("wtype", NEW_TYPES)
def test_embedding(vk, wtype):
    rng = np.random.default_rng(2)
    vocab, dim = 50, COLS[wtype]
    w = Weight("token_embd.weight", wtype, vocab, dim, random_weight(wtype, vocab, dim, rng))
    ops = Ops(
        vk,
        [Op("embedding", "embedding", ("tok",), ("x",), w.name)],
        {"x": BufferSpec(dim)},
        {w.name: w},
        cfg=config(dim=dim, vocab_size=vocab, n_heads=8, head_dim=dim // 8),
    )
    tokens = np.array([0, 49, 7, 7, 23], np.int32)
    ops.write("tok", tokens[:, None])
    ops.run(len(tokens))
    want = decode(w.data, wtype)[tokens]
    np.testing.assert_allclose(ops.read("x")[: len(tokens)], want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("wtype", ["q40", "q6k"])
def test_tied_table_in_row_pieces(vk, monkeypatch, wtype):
    """A table larger than one buffer (a big vocabulary on a 128 MiB device) is uploaded as row pieces: the
    embedding reads each token from its piece and the tied classifier writes each piece's logits."""
    rng = np.random.default_rng(3)
    vocab, dim = 50, 256
    table = Weight("token_embd.weight", wtype, vocab, dim, random_weight(wtype, vocab, dim, rng))
    monkeypatch.setattr(vk, "buffer_limit", 16 * matrix_parts(table)[0].row_words * 4)  # 16 rows a piece
    ops = Ops(
        vk,
        [
            Op("embedding", "embedding", ("tok",), ("x",), table.name),
            Op("matmul", "classifier", ("h",), ("logits",), "output.weight"),
        ],
        {"x": BufferSpec(dim), "h": BufferSpec(dim), "logits": BufferSpec(vocab)},
        {table.name: table, "output.weight": table},
        cfg=config(dim=dim, vocab_size=vocab, n_heads=4, head_dim=64),
    )
    assert [(p.row0, p.rows) for p in ops.prog.slots["output.weight"]] == [
        (0, 16),
        (16, 16),
        (32, 16),
        (48, 2),
    ]
    tokens = np.array([0, 49, 15, 16, 33], np.int32)
    h = rng.standard_normal((len(tokens), dim)).astype(np.float32)
    ops.write("tok", tokens[:, None])
    ops.write("h", h)
    ops.run(len(tokens))
    wf = decode(table.data, wtype)
    np.testing.assert_allclose(ops.read("x")[: len(tokens)], wf[tokens], rtol=1e-6, atol=1e-7)
    h64 = h.astype(np.float64)
    within(ops.read("logits")[: len(tokens)], h64 @ wf.T, np.abs(h64) @ np.abs(wf).T)
