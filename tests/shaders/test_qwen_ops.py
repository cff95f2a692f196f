"""The ops Qwen2 / Qwen3 / Qwen3-MoE add (grouped rmsnorm in place, add_bias, moe_route, moe_matmul, moe_sum)
against float64 references written here."""

from __future__ import annotations

import numpy as np
import pytest
from blocks import decode, random_weight, within
from vk_harness import Ops, config

from engine.graph import BufferSpec, Op
from engine.weight_types import WEIGHT_TYPES, weight_type
from engine.weights import Weight
from shaders.backend import OP_KINDS


def rand(shape, seed: int, scale: float = 1.0) -> np.ndarray:
    return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def test_op_kinds_cover_the_new_ops():
    assert {"rmsnorm", "add_bias", "moe_route", "moe_matmul", "moe_sum"} <= OP_KINDS


# ---- rmsnorm per group, add_bias ----
@pytest.mark.parametrize("group", [24, 96])
def test_rmsnorm_groups_in_place(any_vk, group):
    """Each group of len(weight) values is normalised on its own (Qwen3's per-head q/k norm), in place."""
    width, n, eps = 96, 3, 1e-6
    g = Weight("blk.0.attn_q_norm.weight", "f32", 1, group, rand(group, seed=1, scale=0.3) + 1)
    ops = Ops(
        any_vk,
        [Op("rmsnorm", "q_norm", ("q",), ("q",), g.name, {"eps": eps})],
        {"q": BufferSpec(width)},
        {g.name: g},
        cfg=config(dim=width, n_heads=4, head_dim=24),
    )
    x = rand((n, width), seed=2, scale=2.0)
    ops.write("q", x)
    ops.run(n)
    xg = x.astype(np.float64).reshape(n, width // group, group)
    want = g.data.reshape(-1) * xg / np.sqrt(np.mean(xg * xg, axis=-1, keepdims=True) + eps)
    np.testing.assert_allclose(ops.read("q")[:n], want.reshape(n, width), rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
def test_add_bias(vk, dtype):
    width, n = 160, 5
    f = rand(width, seed=3)
    data = {"f32": f, "f16": f.astype(np.float16), "bf16": (f.view(np.uint32) >> 16).astype(np.uint16)}[dtype]
    bias = Weight("blk.0.attn_k.bias", dtype, 1, width, data.reshape(1, width))
    as_f64 = {
        "f32": f.astype(np.float64),
        "f16": data.astype(np.float64),
        "bf16": (data.astype(np.uint32) << 16).view(np.float32).astype(np.float64),
    }[dtype]
    ops = Ops(
        vk, [Op("add_bias", "k_bias", ("k",), ("k",), bias.name)], {"k": BufferSpec(width)}, {bias.name: bias}
    )
    x = rand((n, width), seed=4)
    ops.write("k", x)
    ops.run(n)
    np.testing.assert_allclose(ops.read("k")[:n], x + as_f64, rtol=1e-6, atol=1e-6)


# ---- mixture of experts ----
def route_reference(logits: np.ndarray, k: int, normalize: bool) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of softmax(logits) per row, descending, ties to the lower expert; weights renormalised or not."""
    z = logits.astype(np.float64)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    idx = np.array([sorted(range(p.shape[1]), key=lambda e, r=r: (-p[r, e], e))[:k] for r in range(len(p))])
    w = np.take_along_axis(p, idx, axis=1)
    return idx, (w / w.sum(axis=1, keepdims=True) if normalize else w)


@pytest.mark.parametrize("normalize", [False, True])
def test_moe_route(vk, normalize):
    n, experts, k = 6, 12, 4
    logits = rand((n, experts), seed=5, scale=2.0)
    logits[1] = 0.5  # every expert tied: experts 0..3
    logits[2, [3, 7, 9, 10, 11]] = 6.0  # a tie across the k-th place: 3, 7, 9, 10 (not 11)
    logits[3, [2, 5]] = [9.0, -9.0]
    ops = Ops(
        vk,
        [Op("moe_route", "route", ("router",), ("moe_idx", "moe_w"), None, {"k": k, "normalize": normalize})],
        {"router": BufferSpec(experts), "moe_idx": BufferSpec(k, "i32"), "moe_w": BufferSpec(k)},
    )
    ops.write("router", logits)
    ops.run(n)
    idx, w = route_reference(logits, k, normalize)
    assert idx[1].tolist() == [0, 1, 2, 3] and idx[2].tolist() == [3, 7, 9, 10]  # the reference's tie rule
    np.testing.assert_array_equal(ops.read("moe_idx")[:n], idx)
    np.testing.assert_allclose(ops.read("moe_w")[:n], w, rtol=2e-6, atol=1e-8)


def test_moe_sum(vk):
    n, k, width = 5, 3, 96
    ys, mw = rand((n, k * width), seed=6), rand((n, k), seed=7)
    ops = Ops(
        vk,
        [Op("moe_sum", "moe_sum", ("moe_y", "moe_w"), ("y",), None, {"slots": k})],
        {"moe_y": BufferSpec(k * width), "moe_w": BufferSpec(k), "y": BufferSpec(width)},
    )
    ops.write("moe_y", ys)
    ops.write("moe_w", mw)
    ops.run(n)
    want = np.einsum("bs,bsi->bi", mw.astype(np.float64), ys.reshape(n, k, width).astype(np.float64))
    np.testing.assert_allclose(ops.read("y")[:n], want, rtol=1e-5, atol=1e-6)


def expert_stack(wtype: str, experts: int, rows: int, cols: int, seed: int) -> tuple[Weight, np.ndarray]:
    """A random expert stack whose expert axis is strided (every other matrix of a larger array, as in a .m
    file's interleaved experts) and its float64 values (experts, rows, cols)."""
    rng = np.random.default_rng(seed)
    wt = weight_type(wtype)
    if wt.quantized:
        mats = [random_weight(wtype, rows, cols, rng) for _ in range(2 * experts)]
        values = np.stack([decode(m, wtype) for m in mats[::2]])
    else:
        f = rng.standard_normal((2 * experts, rows, cols)).astype(np.float32)
        bits = (f.view(np.uint32) >> 16).astype(np.uint16)
        mats = {"f32": f, "f16": f.astype(np.float16), "bf16": bits}[wtype]
        as_f32 = {
            "f32": f,
            "f16": mats.astype(np.float32),
            "bf16": (bits.astype(np.uint32) << 16).view(np.float32),
        }
        values = as_f32[wtype][::2].astype(np.float64)
    data = np.stack(mats)[::2]
    assert not data.flags.c_contiguous and data[0].flags.c_contiguous
    return Weight("blk.0.ffn_up_exps.weight", wtype, rows, cols, data, experts), values


def run_moe_matmul(be, wtype: str, act: str, per_slot: bool, pieces: list | None = None) -> None:
    n, k, experts, rows = 3, 2, 4, 21
    cols = 256 if weight_type(wtype).block_values == 256 else 96
    w, values = expert_stack(wtype, experts, rows, cols, seed=8)
    xw = k * cols if per_slot else cols
    xin = "x_q" if act == "q80" else "x"
    ops = Ops(
        be,
        [Op("moe_matmul", "up", (xin, "moe_idx"), ("moe_up",), w.name, {"slots": k})],
        {xin: BufferSpec(xw, act), "moe_idx": BufferSpec(k, "i32"), "moe_up": BufferSpec(k * rows)},
        {w.name: w},
        act=act,
    )
    if pieces is not None:
        assert [(p.row0, p.rows) for p in ops.prog.slots[w.name]] == pieces
    idx = np.array([[2, 0], [3, 2], [1, 1]], np.int32)  # a token may take the same expert twice
    x = rand((n, xw), seed=9)
    x64 = ops.write_activations(xin, x, act)
    ops.write("moe_idx", idx)
    ops.run(n)
    got = ops.read("moe_up")[:n].reshape(n, k, rows)
    for b in range(n):
        for s in range(k):
            xs = x64[b, s * cols : (s + 1) * cols] if per_slot else x64[b]
            wm = values[idx[b, s]]
            within(got[b, s], wm @ xs, np.abs(wm) @ np.abs(xs))


@pytest.mark.parametrize("wtype", list(WEIGHT_TYPES))
def test_moe_matmul_every_type(vk, wtype):
    """Every weight type as a strided expert stack, input shared by the slots."""
    run_moe_matmul(vk, wtype, "f32", per_slot=False)


@pytest.mark.parametrize("per_slot", [False, True])
@pytest.mark.parametrize("act", ["f32", "q80"])
@pytest.mark.parametrize("wtype", ["q40", "q4k", "q5k", "q6k"])
def test_moe_matmul(any_vk, wtype, act, per_slot):
    """Shared and per-slot inputs, f32 and Q80 activations, in every tuning."""
    run_moe_matmul(any_vk, wtype, act, per_slot)


def test_moe_matmul_in_row_pieces(vk, monkeypatch):
    """An expert stack larger than one buffer is cut into row ranges of every expert."""
    monkeypatch.setattr(vk, "buffer_limit", 8 * 4 * 144)  # 8 rows of 4 Q4_K experts of 256 values a piece
    run_moe_matmul(vk, "q4k", "f32", per_slot=True, pieces=[(0, 8), (8, 8), (16, 5)])
