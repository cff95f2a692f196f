"""The attention split over positions (attention.comp + attention_combine.comp) and KV slots against the CPU
backend's kernels: positions around the chunk and block sizes and up to the end of a 4096-row cache, causal
batches, GQA groups (wider than one workgroup's heads, starting inside a group), f16 caches, KV slots."""

from __future__ import annotations

import numpy as np
import pytest
from vk_harness import Ops, config

from cpu_fallback import kernels
from engine.graph import BufferSpec, Op
from shaders.backend import ATTENTION_HEADS, attention_chunk

SEQ = 4096
POSITIONS = [1, 63, 64, 65, 1000, 4095]  # around the chunk (64, GPU split) and block (64, CPU) sizes


def rand(shape, seed: int, scale: float = 1.0) -> np.ndarray:
    return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def close(got: np.ndarray, want: np.ndarray, rel: float = 1e-5) -> None:
    """Equal up to float32 summation-order noise relative to the result's scale."""
    scale = max(float(np.abs(want).max()), 1e-30)
    err = float(np.abs(got - want).max())
    assert err <= rel * scale, f"max error {err:.3g} vs scale {scale:.3g}"


def attention_ops(be, heads, kv_heads, hd, group, q_offset, kv_type="f32", n_slots=1, max_seq=SEQ) -> Ops:
    """kv_store then attention of layer 0 for a node's `heads` query and `kv_heads` KV heads."""
    cfg = config(dim=heads * hd, n_heads=heads, n_kv_heads=kv_heads, head_dim=hd, n_layers=1)
    seq = ("pos", "slot") if n_slots > 1 else ("pos",)
    att = dict(layer=0, n_heads=heads, n_kv_heads=kv_heads, head_dim=hd, group=group, q_offset=q_offset)
    ops = [
        Op("kv_store", "kv", ("k", "v", *seq), (), None, {"layer": 0}),
        Op("attention", "att", ("q", *seq), ("att",), None, att),
    ]
    q, kv = BufferSpec(heads * hd), BufferSpec(kv_heads * hd)
    buffers = {"q": q, "k": kv, "v": kv, "att": q}
    return Ops(be, ops, buffers, cfg=cfg, max_seq=max_seq, kv_type=kv_type, n_slots=n_slots)


def stored(x: np.ndarray, kv_type: str) -> np.ndarray:
    """Cache rows as the cache holds them: float32, or the nearest-even halves' bits."""
    return x.astype(np.float16).view(np.uint16) if kv_type == "f16" else x


def cpu_attention(q, kc, vc, pos, heads, kv_heads, hd, group, q_offset) -> np.ndarray:
    """The CPU backend's attention of rows q at positions pos over one slot's cache rows."""
    out = np.zeros_like(q)
    scratch = np.zeros((len(q) * heads, kc.shape[0]), np.float32)
    kernels.attention(q, kc, vc, pos, heads, kv_heads, hd, out, scratch, group, q_offset)
    return out


def check_positions(
    ops: Ops, heads, kv_heads, hd, group, q_offset, kv_type, positions, seed, q_scale=3.0, rel=1e-5
) -> None:
    """Over a cache of random rows: for each last position P, a decode step at P and a 4-token prefill
    ending at P (causal: row i sees positions 0..P-3+i), each against the CPU kernel on the same cache;
    q_scale: the queries' scale (the scores grow with it)."""
    kvw = kv_heads * hd
    kc, vc = stored(rand((SEQ, kvw), seed), kv_type), stored(rand((SEQ, kvw), seed + 1), kv_type)
    ops.write_cache("k", 0, kc)
    ops.write_cache("v", 0, vc)
    for i, last in enumerate(positions):
        for n in sorted({1, min(4, last + 1)}):
            pos = np.arange(last - n + 1, last + 1, dtype=np.int32)
            q = rand((n, heads * hd), seed + 10 * i + n, scale=q_scale)
            k, v = rand((n, kvw), seed + 10 * i + n + 5), rand((n, kvw), seed + 10 * i + n + 6)
            for name, a in (("q", q), ("k", k), ("v", v), ("pos", pos[:, None])):
                ops.write(name, a)
            ops.run(n)
            kc[pos], vc[pos] = stored(k, kv_type), stored(v, kv_type)
            want = cpu_attention(q, kc, vc, pos, heads, kv_heads, hd, group, q_offset)
            close(ops.read("att")[:n], want, rel)


@pytest.mark.parametrize("kv_type", ["f32", "f16"])
@pytest.mark.parametrize("heads,kv_heads", [(2, 2), (4, 2), (4, 1)])
def test_attention_at_positions_up_to_the_end_of_the_cache(any_vk, heads, kv_heads, kv_type):
    """Groups of 1, 2 and 4 query heads per KV head, f32 and f16 caches, in every work split; back to short
    positions at the end, where the later chunks' records still hold the long rows' partials."""
    hd = 32
    ops = attention_ops(any_vk, heads, kv_heads, hd, heads // kv_heads, 0, kv_type)
    positions = [*POSITIONS, 65, 1]
    check_positions(ops, heads, kv_heads, hd, heads // kv_heads, 0, kv_type, positions, seed=40)


@pytest.mark.parametrize(
    "heads,kv_heads,hd,group,q_offset",
    [
        (12, 1, 16, 12, 0),  # one KV head for more query heads than a workgroup takes
        (8, 2, 64, 6, 3),  # a node's query heads 3..10 of groups of 6: the first starts inside its group
        (2, 1, 256, 2, 0),  # the largest head size
    ],
)
def test_attention_of_wide_and_offset_groups(any_vk, heads, kv_heads, hd, group, q_offset):
    assert group > ATTENTION_HEADS or q_offset or hd == 256
    ops = attention_ops(any_vk, heads, kv_heads, hd, group, q_offset)
    check_positions(ops, heads, kv_heads, hd, group, q_offset, "f32", [65, 1000, 4095], seed=50)


def test_scores_beyond_the_exponent_range_are_softmaxed_without_overflow(any_vk):
    """Scores near 200, where exp overflows float32: each chunk subtracts its running maximum, the merge the
    largest (float32 scores of that size differ from the CPU's by ~1e-5, hence the wider tolerance)."""
    ops = attention_ops(any_vk, 4, 2, 32, 2, 0)
    check_positions(ops, 4, 2, 32, 2, 0, "f32", [65, 1000, 4095], seed=80, q_scale=50.0, rel=1e-3)


def test_the_gpu_split_chunks_are_what_the_positions_straddle(vk_gpu):
    """63, 64 and 65 sit around a chunk boundary of the GPU split (the CPU split's blocks are 64 long too)."""
    assert attention_chunk(vk_gpu.tuning, SEQ) == 64


@pytest.mark.parametrize("kv_type", ["f32", "f16"])
def test_rows_of_different_slots_read_only_their_slot(any_vk, kv_type):
    """Three rows in one batch: slot 1 at positions 999 and 1000, slot 0 at 70. kv_store writes each row into
    its slot's rows (and nowhere else) and each row's attention equals its slot alone on the CPU kernel."""
    heads, kv_heads, hd, group, n_slots = 4, 2, 32, 2, 3
    kvw = kv_heads * hd
    ops = attention_ops(any_vk, heads, kv_heads, hd, group, 0, kv_type, n_slots)
    caches = {
        (w, s): stored(rand((SEQ, kvw), 60 + 2 * s + (w == "v")), kv_type)
        for w in "kv"
        for s in range(n_slots)
    }
    for (w, s), rows in caches.items():
        ops.write_cache(w, 0, rows, slot=s)
    slots, pos = np.array([1, 1, 0], np.int32), np.array([999, 1000, 70], np.int32)
    q, k, v = rand((3, heads * hd), 70, scale=3.0), rand((3, kvw), 71), rand((3, kvw), 72)
    for name, a in (("q", q), ("k", k), ("v", v), ("pos", pos[:, None]), ("slot", slots[:, None])):
        ops.write(name, a)
    ops.run(3)
    for r in range(3):
        caches["k", slots[r]][pos[r]] = stored(k[r], kv_type)
        caches["v", slots[r]][pos[r]] = stored(v[r], kv_type)
    for (w, s), rows in caches.items():
        np.testing.assert_array_equal(ops.cache(w, 0, slot=s), rows)
    for r in range(3):
        kc, vc = caches["k", slots[r]], caches["v", slots[r]]
        want = cpu_attention(q[r : r + 1], kc, vc, pos[r : r + 1], heads, kv_heads, hd, group, 0)
        close(ops.read("att")[r : r + 1], want)
