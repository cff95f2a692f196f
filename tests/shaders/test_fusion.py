"""The Vulkan backend's fused runs of ops (shaders/backend.py FUSIONS) compute what the ops compute one after
the other: the same logits bit for bit as with the fusion table emptied, on the same device."""

from __future__ import annotations

import numpy as np
import pytest
from blocks import random_weight
from forward_checks import TOKENS, tiny_model
from tinymodel import write_tiny_gguf
from vk_harness import Ops, config

from engine.graph import BufferSpec, Op
from engine.model_file import open_model
from engine.runner import Runner
from engine.weights import Weight
from shaders import backend as vkb
from shaders.backend import Tuning, VulkanBackend
from shaders.weights import matrix_parts

GATE_UP = next(f for f in vkb.FUSIONS if f.kinds == ("matmul", "matmul", "silu_mul"))


def rand(shape, seed: int, scale: float = 1.0) -> np.ndarray:
    return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def _logits(
    model, vk, act: str, kv_type: str = "f32", n_slots: int = 1, runs: list | None = None
) -> tuple[list[np.ndarray], int]:
    """Prefill of 4 tokens (every row's logits), then decode steps: one token, and with slots a batched
    row per slot at different positions; and the dispatches of a decode token (`runs` gets the runs)."""
    runner = Runner(model, vk, act, max_seq_len=16, max_batch=4, kv_type=kv_type, n_slots=n_slots)
    try:
        out = [runner.forward(TOKENS[:4], 0, logits="all")]
        out += [runner.forward([tok], 4 + i) for i, tok in enumerate(TOKENS[4:6])]
        if n_slots > 1:
            runner.forward(TOKENS[6:8], 0, slot=1, logits="none")
            out.append(runner.forward_rows([TOKENS[8], TOKENS[1]], [6, 2], [0, 1]))
        if runs is not None:
            runs += [run for seg in runner.program.runs for run in seg]
        return out, runner.program.counts(0, len(runner.graph.segments), 1).dispatches
    finally:
        runner.close()


@pytest.mark.parametrize(
    ("act", "kv_type", "n_slots", "shape", "arch"),
    [
        ("f32", "f32", 1, "gqa4x2", "llama"),
        ("q80", "f32", 1, "gqa4x2", "llama"),
        ("q80", "f16", 2, "gqa4x2", "llama"),
        ("f32", "f16", 1, "mqa3x1", "llama"),
        ("q80", "f32", 2, "mha5x5", "llama"),
        ("q80", "f16", 1, "gqa4x2", "qwen3"),
        ("q80", "f32", 2, "gqa4x2", "qwen3moe"),
    ],
)
def test_fused_dispatches_match_the_ops_one_by_one_bit_for_bit(
    tmp_path, vk, monkeypatch, act, kv_type, n_slots, shape, arch
):
    """Prefill and decode, f32 and Q80 activations, f32 and f16 KV caches, one and two KV slots; hidden
    widths of an odd block count per row (96, 160, 224: the gating's last pair of blocks half live); Qwen3's
    NeoX RoPE after per-head norms, and Qwen3-MoE's gating of the experts' rows."""
    model, _ = tiny_model(tmp_path, "q40", shape, arch=arch)
    fused, d_fused = _logits(model, vk, act, kv_type, n_slots)
    monkeypatch.setattr(vkb, "FUSIONS", ())
    plain, d_plain = _logits(model, vk, act, kv_type, n_slots)
    # per layer 2 (the ropes and the store); dense FFNs 2 more (gate, up and silu_mul as one; with Q80 the
    # gating's quantisation stays apart), MoE ones with Q80 1 (the gating's quantisation); with Q80 also, over
    # whole pairs of blocks per row (dim 64, not 160), the norms' (one in MoE layers, where the router reads
    # the FFN norm's f32 output and h is quantised after it) and the final norm's
    pairs, moe, q80 = model.config.dim % 64 == 0, arch == "qwen3moe", act == "q80"
    per_layer = 2 + (0 if moe else 2) + q80 * (moe + pairs * (1 if moe else 2))
    assert d_plain - d_fused == model.config.n_layers * per_layer + (q80 and pairs)
    assert len(fused) == len(plain)
    for a, b in zip(fused, plain, strict=True):
        assert np.array_equal(a, b)


FFN_TYPES = ["f32", "f16", "q40", "q80", "q4k", "q6k"]


def _ffn_model(tmp_path, gate: str, up: str):
    """gqa4x2's layers at dim 256 (one K-quant super-block per row), q40 but for these FFN gate and up
    weight types."""
    path = write_tiny_gguf(
        tmp_path / f"ffn-{gate}-{up}.gguf",
        dim=256,
        n_heads=4,
        n_kv_heads=2,
        wtype="q40",
        seed=3,
        types={"ffn_gate": gate, "ffn_up": up},
    )
    return open_model(path)


@pytest.mark.parametrize("act", ["f32", "q80"])
@pytest.mark.parametrize("wtype", FFN_TYPES)
def test_gate_up_and_gating_are_one_dispatch(tmp_path, vk, monkeypatch, wtype, act):
    """Each layer's gate and up matmuls and silu_mul run as one dispatch: per decode token 2 dispatches
    fewer per layer than without that fusion (3 -> 1), with Q80 activations 1 (gate, up, silu_mul +
    quantize_q80 -> the fused dispatch, then quantize_q80 apart); the same logits bit for bit."""
    model = _ffn_model(tmp_path, wtype, wtype)
    runs: list = []
    fused, d_fused = _logits(model, vk, act, runs=runs)
    assert sum(run.fusion is GATE_UP for run in runs) == model.config.n_layers
    monkeypatch.setattr(vkb, "FUSIONS", tuple(f for f in vkb.FUSIONS if f is not GATE_UP))
    plain, d_plain = _logits(model, vk, act)
    assert d_plain - d_fused == model.config.n_layers * (2 if act == "f32" else 1)
    for a, b in zip(fused, plain, strict=True):
        assert np.array_equal(a, b)


def test_gate_and_up_of_different_types_stay_apart(tmp_path, vk):
    """A K-quant mix may give gate and up different types: then the three ops keep their own dispatches."""
    runs: list = []
    _logits(_ffn_model(tmp_path, "q4k", "q6k"), vk, "f32", runs=runs)
    assert not any(run.fusion is GATE_UP for run in runs)
    assert sum(run.ops[0].kind == "silu_mul" for run in runs) == 2


MATMAT = Tuning(split=True, rows=2, batch=2, reduce_wg=64, matvec_wg=8, matmat_from=2)


@pytest.fixture(scope="module")
def matmat_vk() -> VulkanBackend:
    """The GPU split with the mat-mat tiles from 2 batch rows on."""
    return VulkanBackend(subgroups=True, tuning=MATMAT)


@pytest.fixture(params=["device", "gpu-split", "shared-memory", "matmat"])
def path_vk(request) -> VulkanBackend:
    """any_vk's three tunings and the mat-mat one."""
    if request.param == "matmat":
        return request.getfixturevalue("matmat_vk")
    return request.getfixturevalue(
        {"device": "vk", "gpu-split": "vk_gpu", "shared-memory": "vk_plain"}[request.param]
    )


@pytest.mark.parametrize("act", ["f32", "q80"])
@pytest.mark.parametrize("wtype", FFN_TYPES)
def test_gate_up_fused_in_every_matmul_path(path_vk, monkeypatch, wtype, act):
    """gate, up and silu_mul alone, in each tuning's mat-vec path (decode grid, 1 row; prefill grid, 3
    rows; the device's integer dot products for Q80 activations where it has them) and in the mat-mat
    tiles, 37 rows (no multiple of a row group or tile) cut into pieces of 16 rows for the 32-value block
    types: the same gated values bit for bit, 1 dispatch per piece instead of 3 (2 matmuls, 1 silu_mul)."""
    be = path_vk
    rng = np.random.default_rng(4)
    rows, cols = 37, 256
    weights = {
        name: Weight(name, wtype, rows, cols, random_weight(wtype, rows, cols, rng))
        for name in ("blk.0.ffn_gate.weight", "blk.0.ffn_up.weight")
    }
    pieces = 1 if wtype in ("q4k", "q6k") else 3
    if pieces > 1:
        limit = 16 * matrix_parts(weights["blk.0.ffn_gate.weight"])[0].row_words * 4
        monkeypatch.setattr(be, "buffer_limit", limit)
    xin = "h_q" if act == "q80" else "h"
    ops = [
        Op("matmul", "gate", (xin,), ("gate",), "blk.0.ffn_gate.weight"),
        Op("matmul", "up", (xin,), ("up",), "blk.0.ffn_up.weight"),
        Op("silu_mul", "act", ("gate", "up"), ("gate",)),
    ]
    specs = {xin: BufferSpec(cols, act), "gate": BufferSpec(rows), "up": BufferSpec(rows)}
    every = vkb.FUSIONS
    for n in (1, 3):
        x = rng.standard_normal((n, cols)).astype(np.float32)
        results = []
        for fusions in (every, ()):
            monkeypatch.setattr(vkb, "FUSIONS", fusions)
            h = Ops(be, ops, specs, weights, cfg=config(dim=cols, hidden_dim=rows), act=act)
            assert len(h.prog.slots["blk.0.ffn_up.weight"]) == pieces
            h.write_activations(xin, x, act)
            h.run(n)
            results.append((h.read("gate")[:n], h.prog.counts(0, 1, n).dispatches))
        (fused, d_fused), (plain, d_plain) = results
        assert (d_fused, d_plain) == (pieces, 2 * pieces + 1)
        assert np.array_equal(fused, plain)


def _both(vk, monkeypatch, make, inputs: dict, n: int, outputs: tuple[str, ...]):
    """The fused and the unfused program of `make()`'s ops on the same inputs, n tokens: each one's outputs
    (n rows of buffers, as many as the inputs wrote of those they wrote, or ("k", slot) / ("v", slot) for
    layer 0's cache rows) and its dispatch count."""
    results = []
    for fusions in (vkb.FUSIONS, ()):
        monkeypatch.setattr(vkb, "FUSIONS", fusions)
        h = make()
        for name, a in inputs.items():
            h.write(name, a)
        h.run(n)
        rows = {o: len(inputs.get(o, range(n))) for o in outputs if not isinstance(o, tuple)}
        got = [h.cache(o[0], 0, o[1]) if isinstance(o, tuple) else h.read(o)[: rows[o]] for o in outputs]
        results.append((got, h.prog.counts(0, 1, n).dispatches))
    return results


@pytest.mark.parametrize("keep", [False, True])
@pytest.mark.parametrize("n", [1, 3])
def test_norm_and_gating_fused_with_their_quantisation(any_vk, monkeypatch, keep, n):
    """rmsnorm + quantize_q80 (3 pairs of blocks per row) and silu_mul + quantize_q80 (3 blocks per row: with
    3 rows the last pair is half live): the same Q80 bytes, and with a later reader of the f32 results
    (`keep`) the same f32 values; 2 dispatches instead of 4."""
    dim, ff = 192, 96
    norm = Weight("blk.0.attn_norm.weight", "f32", 1, dim, rand(dim, 6, 0.3) + 1)
    ops = [
        Op("rmsnorm", "norm", ("x",), ("h",), norm.name, {"eps": 1e-5}),
        Op("quantize_q80", "hq", ("h",), ("h_q",)),
        Op("silu_mul", "act", ("gate", "up"), ("gate",)),
        Op("quantize_q80", "gq", ("gate",), ("gate_q",)),
    ]
    if keep:  # later readers of h and gate
        ops += [Op("silu_mul", "ra", ("a", "h"), ("a",)), Op("silu_mul", "rb", ("b", "gate"), ("b",))]
    specs = {"x": BufferSpec(dim), "h": BufferSpec(dim), "h_q": BufferSpec(dim, "q80"), "a": BufferSpec(dim)}
    specs |= {n: BufferSpec(ff) for n in ("gate", "up", "b")} | {"gate_q": BufferSpec(ff, "q80")}
    inputs = {"x": rand((n, dim), 7, 2.0), "gate": rand((n, ff), 8, 3.0), "up": rand((n, ff), 9)}
    inputs |= {"a": rand((n, dim), 10), "b": rand((n, ff), 11)}
    for name, width in (("h_q", dim), ("gate_q", ff)):  # every row: bytes past the live rows stay
        inputs[name] = np.full((8, width // 32 * 34), 0xA5, np.uint8)
    outputs = ("h_q", "gate_q", *(("h", "gate", "a", "b") if keep else ()))

    def make():
        return Ops(any_vk, ops, specs, {norm.name: norm}, cfg=config(dim=dim, n_heads=8), act="q80")

    (fused, d_fused), (plain, d_plain) = _both(any_vk, monkeypatch, make, inputs, n, outputs)
    assert d_plain - d_fused == 2
    for a, b in zip(fused, plain, strict=True):
        assert np.array_equal(a, b)


HD = 16
K_NORM = Weight("blk.0.attn_k_norm.weight", "f32", 1, 2 * HD, rand(2 * HD, 4, 0.3) + 1)


def _rope_ops(neox: bool, n_slots: int) -> list[Op]:
    """k written from k0 (so that no op reads the rotated k before it is written again), then rope q, rope k
    and kv_store of layer 0."""
    rope = {"head_dim": HD, "neox": neox}
    return [
        Op("rmsnorm", "kn", ("k0",), ("k",), K_NORM.name, {"eps": 1e-5}),
        Op("rope", "rq", ("q", "pos"), ("q",), None, rope),
        Op("rope", "rk", ("k", "pos"), ("k",), None, rope),
        Op("kv_store", "kv", ("k", "v", "pos", *(("slot",) if n_slots > 1 else ())), (), None, {"layer": 0}),
    ]


ROPE_SPECS = {"q": BufferSpec(4 * HD)} | {n: BufferSpec(2 * HD) for n in ("k0", "k", "v", "c")}


@pytest.mark.parametrize(
    ("neox", "kv_type", "n_slots"), [(False, "f32", 1), (True, "f32", 2), (False, "f16", 2), (True, "f16", 1)]
)
def test_ropes_and_kv_store_fused(any_vk, monkeypatch, neox, kv_type, n_slots):
    """rope q, rope k, kv_store as one dispatch: the same rotated q and the same cache rows (every slot), for
    interleaved and NeoX pairs, f32 and f16 caches, one and two KV slots."""
    n = 3
    inputs = {"q": rand((n, 4 * HD), 1), "k0": rand((n, 2 * HD), 2), "v": rand((n, 2 * HD), 3)}
    inputs["pos"] = np.array([[5], [0], [7]], np.int32)
    if n_slots > 1:
        inputs["slot"] = np.array([[1], [0], [1]], np.int32)
    caches = tuple((c, s) for c in "kv" for s in range(n_slots))

    def make():
        ops = _rope_ops(neox, n_slots)
        return Ops(
            any_vk, ops, ROPE_SPECS, {K_NORM.name: K_NORM}, max_seq=8, kv_type=kv_type, n_slots=n_slots
        )

    (fused, d_fused), (plain, d_plain) = _both(any_vk, monkeypatch, make, inputs, n, ("q", *caches))
    assert (d_fused, d_plain) == (2, 4)
    assert np.array_equal(fused[0], plain[0])
    slots = inputs["slot"][:, 0] if n_slots > 1 else np.zeros(n, np.int32)
    for (_, slot), a, b in zip(caches, fused[1:], plain[1:], strict=True):
        written = inputs["pos"][
            slots == slot, 0
        ]  # the other rows were never written (device memory as found)
        assert written.size and np.array_equal(a[written], b[written])


def test_ropes_stay_apart_when_rotated_k_is_read_later(vk):
    """The fused shader rotates k only into the cache: a later reader of k keeps the three dispatches."""
    ops = [*_rope_ops(False, 1), Op("silu_mul", "reads_k", ("c", "k"), ("c",))]
    prog = Ops(vk, ops, ROPE_SPECS, {K_NORM.name: K_NORM}).prog
    assert [run.fusion for run in prog.runs[0]] == [None] * 5
    assert prog.counts(0, 1, 1).dispatches == 5
    assert Ops(vk, ops[:4], ROPE_SPECS, {K_NORM.name: K_NORM}).prog.counts(0, 1, 1).dispatches == 2
