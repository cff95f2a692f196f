"""Q5_0, Q5_1, Q4_K, Q5_K and Q6_K weights in the matmul and embedding shaders, against float64 products of
gguf-py's own de-quantisation (an independent decoder) on random blocks."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType, quants
from vk_harness import Ops, config

from engine.graph import BufferSpec, Op
from engine.weight_types import weight_type
from engine.weights import Weight
from shaders.weights import matrix_parts

NEW_TYPES = ["q50", "q51", "q4k", "q5k", "q6k"]
# byte offsets of the fp16 fields of a block (scales, minimums): kept small and finite in random blocks
HALF_FIELDS = {"q50": (0,), "q51": (0, 2), "q4k": (0, 2), "q5k": (0, 2), "q6k": (208,)}
# 768 = 3 super-blocks (an odd count: Q6_K's scale words are padded); 1056 = 33 blocks (Q5_0's padded too)
COLS = {"q50": 1056, "q51": 1056, "q4k": 768, "q5k": 768, "q6k": 768}


def random_blocks(wtype: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """(rows, row_bytes) random valid blocks: random bytes, fp16 fields set to small finite values."""
    wt = weight_type(wtype)
    blocks = rng.integers(0, 256, (rows, cols // wt.block_values, wt.block_bytes), dtype=np.uint8)
    for off in HALF_FIELDS[wtype]:
        halves = rng.uniform(-0.02, 0.02, blocks.shape[:2]).astype(np.float16)
        blocks[:, :, off : off + 2] = halves.view(np.uint8).reshape(*blocks.shape[:2], 2)
    return blocks.reshape(rows, -1)


def decoded(wtype: str, data: np.ndarray) -> np.ndarray:
    """gguf-py's de-quantisation, as float64."""
    return quants.dequantize(data, GGMLQuantizationType(weight_type(wtype).ggml_id)).astype(np.float64)


def q80_blocks(x: np.ndarray) -> np.ndarray:
    """x as Q8_0 activation blocks, by gguf-py's quantiser."""
    return quants.quantize(x, GGMLQuantizationType.Q8_0).reshape(x.shape[0], -1)


def within(got: np.ndarray, want: np.ndarray, bound: np.ndarray) -> None:
    """|got - want| within 1e-5 of the sum of the terms' magnitudes (float32 accumulation in any order)."""
    err = np.abs(got - want)
    assert np.all(err <= 1e-5 * bound + 1e-30), f"max error {err.max():.3g}, bound {bound.max():.3g}"


def test_parts_keep_the_total_size():
    """Upload packing splits blocks into aligned arrays of the same total size, plus one padding half per
    row where a lone fp16 scale per block meets an odd block count (hand-computed bytes per row)."""
    row_bytes = {"q50": 33 * 22 + 2, "q51": 33 * 24, "q4k": 3 * 144, "q5k": 3 * 176, "q6k": 3 * 210 + 2}
    rng = np.random.default_rng(0)
    for wtype in NEW_TYPES:
        w = Weight("m", wtype, 5, COLS[wtype], random_blocks(wtype, 5, COLS[wtype], rng))
        parts = matrix_parts(w)
        assert sum(p.words * 4 for p in parts) == 5 * row_bytes[wtype], wtype
        assert parts[0].row_words * 4 % 16 == 0, wtype  # the quantised values load as whole uvec4


@pytest.mark.parametrize("act", ["f32", "q80"])
@pytest.mark.parametrize("wtype", NEW_TYPES)
def test_matmul(any_vk, wtype, act):
    """f32 and Q80 activations, in the device's tuning, the GPU split and its shared-memory variant."""
    rng = np.random.default_rng(1)
    rows, cols = 37, COLS[wtype]  # 37 rows: not a multiple of any row group
    w = Weight("blk.0.attn_q.weight", wtype, rows, cols, random_blocks(wtype, rows, cols, rng))
    wf = decoded(wtype, w.data)
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
        if act == "q80":
            xq = q80_blocks(x)
            ops.write(xin, xq)
            x64 = decoded("q80", xq)
        else:
            ops.write(xin, x)
            x64 = x.astype(np.float64)
        ops.run(n)
        within(ops.read("q")[:n], x64 @ wf.T, np.abs(x64) @ np.abs(wf).T)


@pytest.mark.parametrize("wtype", NEW_TYPES)
def test_embedding(vk, wtype):
    rng = np.random.default_rng(2)
    vocab, dim = 50, COLS[wtype]
    w = Weight("token_embd.weight", wtype, vocab, dim, random_blocks(wtype, vocab, dim, rng))
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
    want = decoded(wtype, w.data)[tokens]
    np.testing.assert_allclose(ops.read("x")[: len(tokens)], want, rtol=1e-6, atol=1e-7)
