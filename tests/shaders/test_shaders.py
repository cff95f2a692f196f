"""Every shader against the CPU backend's kernel on random inputs (odd sizes, odd head counts, offsets)."""

from __future__ import annotations

import math

import gguf
import numpy as np
import pytest
from tinymodel import GGML_TYPES
from vk_harness import Ops, config

from cpu_fallback import kernels
from engine.config import RopeScaling
from engine.graph import BufferSpec, Op
from engine.weight_types import row_bytes
from engine.weights import BLOCK, Weight
from shaders.backend import rope_table
from shaders.weights import group_weights

WTYPES = ["f32", "f16", "bf16", "q40", "q41", "q80"]


def make_weight(name: str, wtype: str, rows: int, cols: int, seed: int) -> Weight:
    """A random matrix stored as `wtype` (quantised by gguf's reference quantiser)."""
    f = (np.random.default_rng(seed).standard_normal((rows, cols)) / math.sqrt(cols)).astype(np.float32)
    if wtype == "f32":
        data = f
    elif wtype == "f16":
        data = f.astype(np.float16)
    elif wtype == "bf16":
        data = (f.view(np.uint32) >> 16).astype(np.uint16)
    else:
        data = gguf.quants.quantize(f, GGML_TYPES[wtype]).reshape(rows, row_bytes(wtype, cols))
    return Weight(name, wtype, rows, cols, data)


def rand(shape, seed: int, scale: float = 1.0) -> np.ndarray:
    return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def q80(x: np.ndarray) -> np.ndarray:
    out = np.zeros((x.shape[0], x.shape[1] // BLOCK * 34), np.uint8)
    kernels.quantize_q80(x, out)
    return out


def close(got: np.ndarray, want: np.ndarray, rel: float = 1e-5) -> None:
    """Equal up to float32 summation-order noise relative to the result's scale."""
    scale = max(float(np.abs(want).max()), 1e-30)
    err = float(np.abs(got - want).max())
    assert err <= rel * scale, f"max error {err:.3g} vs scale {scale:.3g}"


# ---- matmul and embedding in every weight type ----
@pytest.mark.parametrize("act", ["f32", "q80"])
@pytest.mark.parametrize("wtype", WTYPES)
def test_matmul(vk, wtype, act):
    rows, cols = 37, 1056  # 37 rows: not a multiple of any row group; 33 blocks: odd scale-word padding
    w = make_weight("blk.0.attn_q.weight", wtype, rows, cols, seed=1)
    xin = "h_q" if act == "q80" else "h"
    ops = Ops(
        vk,
        [Op("matmul", "mm", (xin,), ("q",), w.name)],
        {xin: BufferSpec(cols, act), "q": BufferSpec(rows)},
        {w.name: w},
        act=act,
    )
    for n in (1, 7):
        x = rand((n, cols), seed=n)
        want = np.zeros((n, rows), np.float32)
        if act == "q80":
            xq = q80(x)
            ops.write(xin, xq)
            kernels.matmul_q80(w.data, wtype, xq, want)
        else:
            ops.write(xin, x)
            kernels.matmul(w.data, wtype, x, want)
        ops.run(n)
        close(ops.read("q")[:n], want, 2e-5)


@pytest.mark.parametrize("act", ["f32", "q80"])
@pytest.mark.parametrize("tuning", ["gpu-split", "shared-memory"])
@pytest.mark.parametrize("wtype", ["q41", "q80"])
def test_matmul_gpu_split(request, wtype, tuning, act):
    """The workgroup-reduction matmul (GPUs), with subgroups and with the shared-memory fallback."""
    be = request.getfixturevalue({"gpu-split": "vk_gpu", "shared-memory": "vk_plain"}[tuning])
    rows, cols = 37, 1056
    w = make_weight("output.weight", wtype, rows, cols, seed=2)
    xin = "h_q" if act == "q80" else "h"
    ops = Ops(
        be,
        [Op("matmul", "mm", (xin,), ("logits",), w.name)],
        {xin: BufferSpec(cols, act), "logits": BufferSpec(rows)},
        {w.name: w},
        act=act,
    )
    n = 5
    x = rand((n, cols), seed=3)
    want = np.zeros((n, rows), np.float32)
    if act == "q80":
        ops.write(xin, q80(x))
        kernels.matmul_q80(w.data, wtype, q80(x), want)
    else:
        ops.write(xin, x)
        kernels.matmul(w.data, wtype, x, want)
    ops.run(n)
    close(ops.read("logits")[:n], want, 2e-5)


def test_matmul_layers_share_a_buffer(vk):
    """Three layers' matrices in one buffer: each op must read its own layer (push-constant offset)."""
    ws = {
        f"blk.{i}.ffn_up.weight": make_weight(f"blk.{i}.ffn_up.weight", "q40", 40, 64, seed=10 + i)
        for i in range(3)
    }
    ops = Ops(
        vk,
        [Op("matmul", f"mm{i}", ("h",), (f"o{i}",), f"blk.{i}.ffn_up.weight") for i in range(3)],
        {"h": BufferSpec(64), **{f"o{i}": BufferSpec(40) for i in range(3)}},
        ws,
        cfg=config(n_layers=3),
    )
    assert len(ops.prog.chunks) == 1
    x = rand((3, 64), seed=4)
    ops.write("h", x)
    ops.run(3)
    for i in range(3):
        want = np.zeros((3, 40), np.float32)
        kernels.matmul(ws[f"blk.{i}.ffn_up.weight"].data, "q40", x, want)
        close(ops.read(f"o{i}")[:3], want)


def test_weight_chunks_respect_the_buffer_limit():
    ws = {
        f"blk.{i}.attn_k.weight": make_weight(f"blk.{i}.attn_k.weight", "q41", 8, 64, seed=i)
        for i in range(5)
    }
    ws["output.weight"] = ws["blk.0.attn_k.weight"]  # the same array under two names is uploaded once
    per_layer = 8 * 2 * 16  # the larger part: 8 rows of 2 blocks of 16 nibble bytes
    chunks, pieces = group_weights(ws, limit=2 * per_layer)
    assert [len(c.weights) for c in chunks] == [2, 2, 1]
    got = [[(p.chunk, p.index, p.row0, p.rows) for p in pieces[f"blk.{i}.attn_k.weight"]] for i in range(5)]
    assert got == [[(0, 0, 0, 8)], [(0, 1, 0, 8)], [(1, 0, 0, 8)], [(1, 1, 0, 8)], [(2, 0, 0, 8)]]
    assert pieces["output.weight"] == pieces["blk.0.attn_k.weight"]


def test_weights_larger_than_a_buffer_become_row_pieces():
    """A matrix beyond the limit is cut into row ranges; the same piece of every layer shares a chunk."""
    ws = {
        f"blk.{i}.ffn_up.weight": make_weight(f"blk.{i}.ffn_up.weight", "q40", 10, 64, seed=i)
        for i in range(2)
    }
    row = 2 * 16  # the larger part: 2 blocks of 16 nibble bytes per row
    chunks, pieces = group_weights(ws, limit=4 * row)
    for i in range(2):
        assert [(p.row0, p.rows) for p in pieces[f"blk.{i}.ffn_up.weight"]] == [(0, 4), (4, 4), (8, 2)]
    assert [len(c.weights) for c in chunks] == [
        1,
        1,
        1,
        1,
        2,
    ]  # a 4-row piece fills a buffer, 2-row ones pair
    assert max(w for c in chunks for w in c.part_words) * 4 <= 4 * row
    chunks, pieces = group_weights(ws, limit=row)  # one-row pieces stay matrices (not norm vectors)
    assert len(pieces["blk.0.ffn_up.weight"]) == 10 and not any(c.vector for c in chunks)
    assert {tuple(c.part_words) for c in chunks} == {(8, 1)}  # 2 blocks: 8 nibble words, 1 scale word


@pytest.mark.parametrize("wtype", WTYPES)
def test_embedding(vk, wtype):
    vocab, dim = 50, 96
    w = make_weight("token_embd.weight", wtype, vocab, dim, seed=5)
    ops = Ops(
        vk,
        [Op("embedding", "embedding", ("tok",), ("x",), w.name)],
        {"x": BufferSpec(dim)},
        {w.name: w},
        cfg=config(dim=dim, vocab_size=vocab, n_heads=6),
    )
    tokens = np.array([0, 49, 7, 7, 23], np.int32)
    ops.write("tok", tokens[:, None])
    ops.run(len(tokens))
    want = np.zeros((len(tokens), dim), np.float32)
    kernels.embedding(w.data, wtype, tokens, want)
    np.testing.assert_array_equal(ops.read("x")[: len(tokens)], want)


# ---- normalisation, activations, Q80 codec ----
@pytest.mark.parametrize("dim", [96, 1000])
def test_rmsnorm(any_vk, dim):
    norm = Weight("blk.0.attn_norm.weight", "f32", 1, dim, rand(dim, seed=6, scale=0.3) + 1)
    ops = Ops(
        any_vk,
        [Op("rmsnorm", "norm", ("x",), ("h",), norm.name, {"eps": 1e-5})],
        {"x": BufferSpec(dim), "h": BufferSpec(dim)},
        {norm.name: norm},
        cfg=config(dim=dim, n_heads=8),
    )
    x = rand((3, dim), seed=7, scale=2.0)
    ops.write("x", x)
    ops.run(3)
    want = np.zeros_like(x)
    kernels.rmsnorm(x, norm.data.reshape(-1), 1e-5, want)
    close(ops.read("h")[:3], want)


def test_silu_mul(vk):
    width = 1000
    ops = Ops(
        vk,
        [Op("silu_mul", "act", ("gate", "up"), ("gate",))],
        {"gate": BufferSpec(width), "up": BufferSpec(width)},
    )
    gate, up = rand((3, width), seed=8, scale=3.0), rand((3, width), seed=9)
    ops.write("gate", gate)
    ops.write("up", up)
    ops.run(3)
    want = gate.copy()
    kernels.silu_mul(want, up)
    close(ops.read("gate")[:3], want)


def _decode_q80(b: np.ndarray) -> np.ndarray:
    out = np.zeros((b.shape[0], b.shape[1] // 34 * BLOCK), np.float32)
    kernels.dequantize_q80(np.ascontiguousarray(b), out)
    return out


def test_quantize_q80(vk):
    width, n = 96, 7  # 21 blocks in all: the last block pair is half empty
    ops = Ops(
        vk,
        [Op("quantize_q80", "quant", ("h",), ("h_q",))],
        {"h": BufferSpec(width), "h_q": BufferSpec(width, "q80")},
    )
    x = rand((n, width), seed=11)
    x[2, :32] = 0.0  # an all-zero block: d = 0
    ops.write("h", x)
    ops.run(n)
    got, want = ops.read("h_q")[:n], q80(x)
    # identical bytes except where x / d sits on a rounding boundary (GPU division is not exactly rounded)
    assert np.mean(got == want) > 0.99
    d = np.abs(x).reshape(n, -1, BLOCK).max(axis=2, keepdims=True) / 127
    assert np.all(np.abs(_decode_q80(got) - _decode_q80(want)).reshape(n, -1, BLOCK) <= d * 1.01)


@pytest.mark.parametrize("act", ["f32", "q80"])
def test_to_pipe_writes_only_its_slot(vk, act):
    """Node 1 of 3 writes its partial sum into slot 1 of the zq pipe; the other slots and rows are kept."""
    cfg = config(dim=64, n_kv_heads=3, n_heads=6)
    ops = Ops(
        vk,
        [Op("to_pipe", "out", ("y",), ("zq",), None, {"slot": 1})],
        {"y": BufferSpec(64)},
        cfg=cfg,
        n_nodes=3,
        act=act,
    )
    before = ops.read("zq")
    before[:] = np.random.default_rng(12).integers(0, 255, before.shape).astype(before.dtype)
    ops.write("zq", before)
    y = rand((5, 64), seed=13)
    ops.write("y", y)
    ops.run(5)
    got = ops.read("zq")
    width = before.shape[1] // 3
    other = np.ones(before.shape, bool)
    other[:5, width : 2 * width] = False
    np.testing.assert_array_equal(got[other], before[other])
    slot = got[:5, width : 2 * width]
    if act == "f32":
        np.testing.assert_array_equal(slot, y)
    else:
        assert np.mean(slot == q80(y)) > 0.99


@pytest.mark.parametrize("act", ["f32", "q80"])
def test_merge_add(vk, act):
    cfg = config(dim=64, n_kv_heads=3, n_heads=6)
    ops = Ops(
        vk, [Op("merge_add", "merge", ("zq",), ("x",))], {"x": BufferSpec(64)}, cfg=cfg, n_nodes=3, act=act
    )
    slots = [rand((4, 64), seed=20 + s) for s in range(3)]
    zq = np.concatenate([q80(s) if act == "q80" else s for s in slots], axis=1)
    x = rand((4, 64), seed=14)
    ops.write("zq", zq)
    ops.write("x", x)
    ops.run(4)
    want = x.copy()
    for s in slots:  # slot by slot, in node order
        want += _decode_q80(q80(s)) if act == "q80" else s
    close(ops.read("x")[:4], want, 1e-6)


# ---- RoPE, KV cache and attention ----
@pytest.mark.parametrize("scaling", [None, RopeScaling(8.0, 1.0, 4.0, 64)])
def test_rope_table_matches_cpu(scaling):
    cfg = config(head_dim=64, rope_theta=500000.0, rope_scaling=scaling)
    factors = np.linspace(1.0, 3.0, 32).astype(np.float32)
    for f in (None, factors):
        table = rope_table(cfg, f, 300)
        s = (
            None
            if scaling is None
            else (scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor, scaling.orig_max_seq_len)
        )
        cos, sin = kernels.rope_table(64, 500000.0, False, s, f, 300)
        np.testing.assert_allclose(table[..., 0], cos, atol=1e-6)
        np.testing.assert_allclose(table[..., 1], sin, atol=1e-6)


@pytest.mark.parametrize("neox", [False, True])
def test_rope(vk, neox):
    hd, heads = 64, 9
    cfg = config(dim=576, n_heads=heads, n_kv_heads=3, head_dim=hd, rope_theta=100000.0, rope_neox=neox)
    ops = Ops(
        vk,
        [Op("rope", "rope_q", ("q", "pos"), ("q",), None, {"head_dim": hd, "neox": neox})],
        {"q": BufferSpec(heads * hd)},
        cfg=cfg,
        max_seq=600,
    )
    pos = np.array([0, 1, 17, 599, 300], np.int32)
    q = rand((5, heads * hd), seed=15)
    ops.write("q", q)
    ops.write("pos", pos[:, None])
    ops.run(5)
    cos, sin = kernels.rope_table(hd, 100000.0, neox, None, None, 600)
    want = q.copy()
    kernels.rope(want, pos, cos, sin, hd, neox)
    close(ops.read("q")[:5], want)


def kv_attention_ops(vk, cfg, layer, heads, kv_heads, group, q_offset, **kw) -> Ops:
    """kv_store then attention of `layer` for a node's `heads` query and `kv_heads` KV heads (head_dim from
    cfg), its first query head `q_offset` into a GQA group of `group`."""
    hd = cfg.head_dim
    att = dict(layer=layer, n_heads=heads, n_kv_heads=kv_heads, head_dim=hd, group=group, q_offset=q_offset)
    ops = [
        Op("kv_store", "kv", ("k", "v", "pos"), (), None, {"layer": layer}),
        Op("attention", "att", ("q", "pos"), ("att",), None, att),
    ]
    q, kv = BufferSpec(heads * hd), BufferSpec(kv_heads * hd)
    return Ops(vk, ops, {"q": q, "k": kv, "v": kv, "att": q}, cfg=cfg, **kw)


@pytest.mark.parametrize(
    "heads,kv_heads,hd,seq,p0,group,q_offset",
    [
        (9, 3, 64, 64, 20, 3, 0),
        (5, 5, 32, 64, 20, 1, 0),
        (6, 2, 16, 64, 20, 3, 0),
        (3, 1, 64, 4096, 4000, 3, 0),
        (4, 2, 64, 64, 20, 3, 2),  # a node's query heads 2..5 of GQA groups of 3: KV heads 0..1
        (1, 1, 32, 64, 20, 3, 1),
    ],
)
def test_kv_store_and_attention(any_vk, heads, kv_heads, hd, seq, p0, group, q_offset):
    """A 7-token prefill at positions p0.. of layer 1 over p0 cached rows: causal within the batch; the fourth
    case fills a 4096-long context almost to the end, the last two hold query heads that start inside a GQA
    group (a node beyond the KV-head count)."""
    n, layer = 7, 1
    cfg = config(dim=heads * hd, n_heads=heads, n_kv_heads=kv_heads, head_dim=hd, n_layers=2)
    kvw = kv_heads * hd
    ops = kv_attention_ops(any_vk, cfg, layer, heads, kv_heads, group, q_offset, max_seq=seq)
    old_k, old_v = rand((p0, kvw), seed=16), rand((p0, kvw), seed=17)
    ops.write_cache("k", layer, old_k)
    ops.write_cache("v", layer, old_v)
    q, k, v = rand((n, heads * hd), seed=18), rand((n, kvw), seed=19), rand((n, kvw), seed=20)
    pos = np.arange(p0, p0 + n, dtype=np.int32)
    for name, a in (("q", q), ("k", k), ("v", v), ("pos", pos[:, None])):
        ops.write(name, a)
    ops.run(n)
    kc, vc = np.zeros((seq, kvw), np.float32), np.zeros((seq, kvw), np.float32)
    kc[:p0], vc[:p0], kc[p0 : p0 + n], vc[p0 : p0 + n] = old_k, old_v, k, v
    np.testing.assert_array_equal(ops.cache("k", layer)[: p0 + n], kc[: p0 + n])
    np.testing.assert_array_equal(ops.cache("v", layer)[: p0 + n], vc[: p0 + n])
    want = np.zeros((n, heads * hd), np.float32)
    scratch = np.zeros((n * heads, seq), np.float32)
    kernels.attention(q, kc, vc, pos, heads, kv_heads, hd, want, scratch, group, q_offset)
    close(ops.read("att")[:n], want)


def test_decode_attention_reads_one_token(vk):
    """A single decode step (its own grid size) at position 0 attends to itself only: output = v."""
    cfg = config(dim=64, n_heads=4, n_kv_heads=2, head_dim=16)
    ops = kv_attention_ops(vk, cfg, 0, 4, 2, 2, 0)
    v = rand((1, 32), seed=21)
    for name, a in (
        ("q", rand((1, 64), seed=22)),
        ("k", rand((1, 32), seed=23)),
        ("v", v),
        ("pos", np.zeros((1, 1), np.int32)),
    ):
        ops.write(name, a)
    ops.run(1)
    out = ops.read("att")[0].reshape(4, 16)
    vh = v.reshape(2, 16)
    close(out, vh[[0, 0, 1, 1]], 1e-6)


def _half_cases(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """float32 values that exercise half rounding: random, exact ties (to odd and to even), subnormal halves
    and their ties, values that round up into the next exponent, beyond the largest half, and zeros."""
    a = rng.standard_normal(shape).astype(np.float32) * 3
    special = np.array(
        [1 + 2**-11, 1 + 3 * 2**-11, 2**-20, 3 * 2**-25, 2**-26, 2 - 2**-12, 65520.0, 1e6, 0.0, 2**-15],
        np.float32,
    )
    flat = a.reshape(-1)
    flat[: special.size], flat[special.size : 2 * special.size] = special, -special
    return a


@pytest.mark.parametrize("group,q_offset,heads,kv_heads", [(2, 0, 4, 2), (3, 2, 4, 2)])
def test_f16_kv_cache_rounds_like_numpy_and_attends_like_the_cpu(any_vk, group, q_offset, heads, kv_heads):
    """--kv-cache-type f16: kv_store writes the round-to-nearest-even halves numpy writes (bit for bit, ties,
    subnormals and overflow included), and attention over them gives the CPU kernel's output on the same
    half caches."""
    n, hd, seq = 5, 32, 64
    kvw = kv_heads * hd
    cfg = config(dim=heads * hd, n_heads=heads, n_kv_heads=kv_heads, head_dim=hd, n_layers=1)
    ops = kv_attention_ops(any_vk, cfg, 0, heads, kv_heads, group, q_offset, max_seq=seq, kv_type="f16")
    pos = np.arange(n, dtype=np.int32)  # every attended row written: storage memory starts undefined
    rng = np.random.default_rng(31)
    for name, a in (
        ("k", _half_cases(rng, (n, kvw))),
        ("v", _half_cases(rng, (n, kvw))),
        ("pos", pos[:, None]),
    ):
        ops.write(name, a)
    ops.run(n)
    for which in ("k", "v"):
        with np.errstate(over="ignore"):  # 65520 and 1e6 become infinities, as they must
            want = ops.read(which)[:n].astype(np.float16).view(np.uint16)
        np.testing.assert_array_equal(ops.cache(which, 0)[:n], want)
    q, k, v = rand((n, heads * hd), seed=32), rand((n, kvw), seed=33), rand((n, kvw), seed=34)
    for name, a in (("q", q), ("k", k), ("v", v)):
        ops.write(name, a)
    ops.run(n)
    kc, vc = k.astype(np.float16).view(np.uint16), v.astype(np.float16).view(np.uint16)
    want = np.zeros((n, heads * hd), np.float32)
    kernels.attention(
        q, kc, vc, pos, heads, kv_heads, hd, want, np.zeros((n * heads, n), np.float32), group, q_offset
    )
    close(ops.read("att")[:n], want)
