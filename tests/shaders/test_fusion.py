"""The Vulkan backend's fused runs of ops (shaders/backend.py FUSIONS) compute what the ops compute one after
the other: the same logits bit for bit as with the fusion table emptied, on the same device."""

from __future__ import annotations

import numpy as np
import pytest
from forward_checks import TOKENS, tiny_model
from vk_harness import Ops, config

from engine.graph import BufferSpec, Op
from engine.runner import Runner
from engine.weights import Weight
from shaders import backend as vkb


def rand(shape, seed: int, scale: float = 1.0) -> np.ndarray:
    return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def _logits(model, vk, act: str, kv_type: str, n_slots: int) -> tuple[list[np.ndarray], int]:
    """Prefill of 4 tokens (every row's logits), then decode steps: one token, and with slots a batched
    row per slot at different positions; and the dispatches of a decode token."""
    runner = Runner(model, vk, act, max_seq_len=16, max_batch=4, kv_type=kv_type, n_slots=n_slots)
    try:
        out = [runner.forward(TOKENS[:4], 0, logits="all")]
        out += [runner.forward([tok], 4 + i) for i, tok in enumerate(TOKENS[4:6])]
        if n_slots > 1:
            runner.forward(TOKENS[6:8], 0, slot=1, logits="none")
            out.append(runner.forward_rows([TOKENS[8], TOKENS[1]], [6, 2], [0, 1]))
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
    # per layer 2 (the ropes and the store); with Q80 also the gating's quantisation and, over whole pairs of
    # blocks per row (dim 64, not 160), the norms' (one in MoE layers, where the router reads the FFN
    # norm's f32 output and h is quantised after it) and the final norm's
    pairs = model.config.dim % 64 == 0
    per_layer = 2 if act == "f32" else 3 + pairs * (1 if arch == "qwen3moe" else 2)
    assert d_plain - d_fused == model.config.n_layers * per_layer + (act == "q80" and pairs)
    assert len(fused) == len(plain)
    for a, b in zip(fused, plain, strict=True):
        assert np.array_equal(a, b)


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
