"""CPU kernels against independent float64 numpy computations; weights are decoded by gguf-py's dequantize."""

from __future__ import annotations

import math

import numba
import numpy as np
import pytest
from blocks import FLOAT, QUANT, decode, random_weight
from gguf.quants import GGMLQuantizationType, quantize

from cpu_fallback import kernels as K
from engine.errors import DllamaError
from engine.weight_types import weight_type


def unit(wtype: str) -> int:
    """Values per block (32 for the float types, whose rows the kernels also run 32 at a time)."""
    return max(weight_type(wtype).block_values, 32)


def q80_reference(x: np.ndarray) -> np.ndarray:
    """Spec 2.2 in numpy float32: d = amax/127, q = round-half-even(x * (1/d)), d stored as fp16."""
    blocks = x.astype(np.float32).reshape(x.shape[0], -1, 32)
    d = np.abs(blocks).max(axis=-1, keepdims=True) / np.float32(127)
    safe = np.where(d == 0, np.float32(1), d)
    inv = np.where(d == 0, np.float32(0), np.float32(1) / safe).astype(np.float32)
    q = np.rint(blocks * inv).astype(np.int8)
    out = np.concatenate([d.astype(np.float16).view(np.uint8), q.view(np.uint8)], axis=-1)
    return out.reshape(x.shape[0], -1)


def tolerance(x: np.ndarray, w: np.ndarray, rel: float = 1e-5) -> np.ndarray:
    """Allowed |error| of x @ w.T: rel times the sum of |products| (a float32 accumulation bound)."""
    return rel * (np.abs(x) @ np.abs(w).T) + 1e-30


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


# ----------------------------------------------------------------------------------------------------------
# Q80 codec
# ----------------------------------------------------------------------------------------------------------


def test_quantize_q80_matches_spec_and_gguf(rng):
    x = rng.standard_normal((7, 96)).astype(np.float32) * rng.uniform(0.01, 10, (7, 1)).astype(np.float32)
    out = np.zeros((7, 3 * 34), np.uint8)
    K.quantize_q80(x, out)
    assert np.array_equal(out, q80_reference(x))
    assert np.array_equal(out, quantize(x, GGMLQuantizationType.Q8_0))  # no exact .5 ties in random data


def test_quantize_q80_rounds_half_to_even_and_handles_zero_blocks():
    x = np.zeros((1, 64), np.float32)
    x[0, :6] = [127.0, 2.5, -2.5, 0.5, 1.5, -126.5]  # amax 127 -> d = 1 exactly, so x * (1/d) = x
    K.quantize_q80(x, out := np.full((1, 68), 7, np.uint8))
    assert out[0, :2].view(np.float16)[0] == 1.0
    assert out[0, 2:8].view(np.int8).tolist() == [127, 2, -2, 0, 2, -126]
    assert not out[0, 8:34].any() and not out[0, 34:].any()  # second block all zero: d = 0, q = 0


def test_quantize_q80_into_a_column_slot_of_a_wider_buffer(rng):
    x = rng.standard_normal((3, 64)).astype(np.float32)
    buf = np.full((5, 3 * 68), 9, np.uint8)
    K.quantize_q80(x, buf[:3, 68:136])
    assert np.array_equal(buf[:3, 68:136], q80_reference(x))
    assert (buf[:3, :68] == 9).all() and (buf[:3, 136:] == 9).all() and (buf[3:] == 9).all()


def test_dequantize_q80(rng):
    xq = random_weight("q80", 7, 96, rng)
    out = np.empty((7, 96), np.float32)
    K.dequantize_q80(xq, out)
    assert np.array_equal(out.astype(np.float64), decode(xq, "q80"))


def test_merge_add_q80_adds_slices_in_order(rng):
    x = rng.standard_normal((2, 64)).astype(np.float32)
    slices = np.concatenate([random_weight("q80", 2, 64, rng) for _ in range(3)], axis=1)
    expect = x.copy()
    for s in range(3):  # float32 additions, one slice after another
        expect = expect + decode(slices[:, s * 68 : (s + 1) * 68], "q80").astype(np.float32)
    K.merge_add_q80(x, slices)
    assert np.array_equal(x, expect)


# ----------------------------------------------------------------------------------------------------------
# matmul
# ----------------------------------------------------------------------------------------------------------

# row counts that are not a multiple of the 4-row quads; float weights also get a row that is not a multiple
# of the 8-lane vectors
MATMUL_CASES = [(t, r, unit(t) * n) for t in FLOAT + QUANT for r, n in ((1, 1), (5, 3), (37, 2), (130, 1))]
MATMUL_CASES += [(t, 9, 67) for t in FLOAT]


@pytest.mark.parametrize("wtype,rows,cols", MATMUL_CASES)
@pytest.mark.parametrize("batch", [1, 3])
def test_matmul_matches_float64(wtype, batch, rows, cols, rng):
    w = random_weight(wtype, rows, cols, rng)
    x = rng.standard_normal((batch, cols)).astype(np.float32)
    out = np.full((batch, rows), np.nan, np.float32)
    K.matmul(w, wtype, x, out)
    wf = decode(w, wtype)
    expect = x.astype(np.float64) @ wf.T
    assert np.all(np.abs(out - expect) <= tolerance(x, wf))


@pytest.mark.parametrize("wtype,rows,cols", [c for c in MATMUL_CASES if c[2] % 32 == 0])
@pytest.mark.parametrize("batch", [1, 3])
def test_matmul_q80_is_the_product_with_the_dequantised_activations(wtype, batch, rows, cols, rng):
    w = random_weight(wtype, rows, cols, rng)
    x = rng.standard_normal((batch, cols)).astype(np.float32)
    xq = q80_reference(x)
    out = np.full((batch, rows), np.nan, np.float32)
    K.matmul_q80(w, wtype, xq, out)
    xd, wf = decode(xq, "q80"), decode(w, wtype)
    expect = xd @ wf.T
    assert np.all(np.abs(out - expect) <= tolerance(xd, wf))
    # and it is the product with the de-quantised activations, not with x itself
    assert np.abs(expect - x.astype(np.float64) @ wf.T).max() > 10 * np.abs(out - expect).max()


def test_matmul_on_the_embedded_model_shapes_and_threads(rng):
    w = random_weight("q41", 1536, 576, rng)
    w.setflags(write=False)  # model files are mapped read-only
    x = rng.standard_normal((3, 576)).astype(np.float32)
    expect = x.astype(np.float64) @ decode(w, "q41").T
    before = numba.get_num_threads()
    try:
        for n in range(1, numba.config.NUMBA_NUM_THREADS + 1):
            K.set_threads(n)
            assert numba.get_num_threads() == n
            for batch in (1, 3):
                out = np.full((batch, 1536), np.nan, np.float32)
                K.matmul(w, "q41", x[:batch], out)
                assert np.all(np.abs(out - expect[:batch]) <= tolerance(x[:batch], decode(w, "q41")))
    finally:
        numba.set_num_threads(before)


def test_matmul_of_row_views_with_a_stride_of_whole_rows(rng):
    table = random_weight("q6k", 12, 512, rng)
    w = table[:, :210]  # the first super-block of every row: rows 420 bytes apart, 210 used
    x = rng.standard_normal((1, 256)).astype(np.float32)
    out = np.empty((1, 12), np.float32)
    K.matmul(w, "q6k", x, out)
    wf = decode(np.ascontiguousarray(w), "q6k")
    assert np.all(np.abs(out - x @ wf.T) <= tolerance(x, wf))


def test_matmul_rejects_bad_input(rng):
    w = random_weight("q41", 8, 64, rng)
    with pytest.raises(DllamaError, match="shapes disagree"):
        K.matmul(w, "q41", np.zeros((1, 32), np.float32), np.zeros((1, 8), np.float32))
    with pytest.raises(DllamaError, match="unknown weight type 'q3k'"):
        K.matmul(w, "q3k", np.zeros((1, 64), np.float32), np.zeros((1, 8), np.float32))
    with pytest.raises(DllamaError, match="shapes disagree"):
        K.matmul_q80(w, "q41", np.zeros((1, 64), np.uint8), np.zeros((1, 8), np.float32))
    with pytest.raises(DllamaError, match="not a whole number of Q4_K blocks"):
        K.matmul(
            random_weight("q40", 8, 64, rng),
            "q4k",
            np.zeros((1, 256), np.float32),
            np.zeros((1, 8), np.float32),
        )
    k = random_weight("q4k", 8, 256, rng)
    with pytest.raises(DllamaError, match="shapes disagree: q4k weight 8x256"):
        K.matmul(k, "q4k", np.zeros((1, 128), np.float32), np.zeros((1, 8), np.float32))
    with pytest.raises(DllamaError, match="2-D"):
        K.matmul(k[None], "q4k", np.zeros((1, 256), np.float32), np.zeros((1, 8), np.float32))


@pytest.mark.parametrize("bad", [0, -1, 10_000, 1.5])
def test_set_threads_validates(bad):
    with pytest.raises(DllamaError, match="thread count"):
        K.set_threads(bad)


# ----------------------------------------------------------------------------------------------------------
# embedding, norms, elementwise
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("wtype", FLOAT + QUANT)
def test_embedding_rows(wtype, rng):
    w = random_weight(wtype, 50, 2 * unit(wtype), rng)
    tokens = np.array([3, 49, 0, 3, 17, 8, 22], np.int32)
    out = np.empty((7, w.shape[1] if wtype in FLOAT else 2 * unit(wtype)), np.float32)
    K.embedding(w, wtype, tokens, out)
    expect = decode(w, wtype)[tokens]
    assert np.all(np.abs(out - expect) <= 1e-6 * np.abs(expect).max(axis=1, keepdims=True))


def test_embedding_rejects_unknown_token(rng):
    w = random_weight("q80", 10, 32, rng)
    with pytest.raises(DllamaError, match="token id 10 is outside the vocabulary"):
        K.embedding(w, "q80", np.array([2, 10], np.int32), np.empty((2, 32), np.float32))


def rmsnorm_reference(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """Every group of len(weight) consecutive values normalised on its own, in float64."""
    g = x.astype(np.float64).reshape(x.shape[0], -1, weight.shape[0])
    out = weight * g / np.sqrt((g * g).mean(axis=-1, keepdims=True) + eps)
    return out.reshape(x.shape)


@pytest.mark.parametrize("batch,n,m", [(1, 576, 576), (7, 37, 37), (3, 4 * 64, 64), (2, 6 * 128, 128)])
def test_rmsnorm_whole_rows_and_per_head(batch, n, m, rng):
    x = rng.standard_normal((batch, n)).astype(np.float32) * rng.uniform(0.1, 5, (batch, n // m)).repeat(m, 1)
    x = x.astype(np.float32)
    weight = rng.uniform(0.5, 1.5, m).astype(np.float32)
    out = np.empty_like(x)
    K.rmsnorm(x, weight, 1e-6, out)
    expect = rmsnorm_reference(x, weight, 1e-6)
    assert np.allclose(out, expect, rtol=1e-5, atol=1e-6)
    K.rmsnorm(x, weight, 1e-6, x)  # in place, as Qwen3's q/k norm runs
    assert np.array_equal(x, out)


def test_rmsnorm_rejects_a_weight_that_does_not_divide_the_row():
    x = np.ones((2, 96), np.float32)
    for weight in (np.ones(40, np.float32), np.ones(0, np.float32), np.ones((2, 48), np.float32)):
        with pytest.raises(DllamaError, match="rmsnorm shapes disagree"):
            K.rmsnorm(x, weight, 1e-5, x)


def test_add_bias(rng):
    x = rng.standard_normal((3, 40)).astype(np.float32)
    bias = rng.standard_normal(40).astype(np.float32)
    expect = x + bias
    K.add_bias(x, bias)
    assert np.array_equal(x, expect)
    for bad in (bias[:39], bias.astype(np.float64)):
        with pytest.raises(DllamaError, match="add_bias shapes disagree"):
            K.add_bias(x, bad)


def test_silu_mul_and_add(rng):
    gate = np.concatenate([rng.standard_normal((7, 45)) * 4, np.full((7, 3), [-100.0, 100.0, 0.0])], axis=1)
    gate = gate.astype(np.float32)
    up = rng.standard_normal((7, 48)).astype(np.float32)
    g64 = gate.astype(np.float64)
    expect = g64 / (1 + np.exp(-g64)) * up
    K.silu_mul(gate, up)
    assert np.allclose(gate, expect, rtol=1e-5, atol=1e-7)
    y = rng.standard_normal((7, 48)).astype(np.float32)
    before = gate.copy()
    K.add(gate, y)
    assert np.array_equal(gate, before + y)


def llama31_freq(freq: float, factor: float, low: float, high: float, orig: int) -> float:
    """Spec 4.8, one frequency at a time."""
    wavelen = 2 * math.pi / freq
    if wavelen < orig / high:
        return freq
    if wavelen > orig / low:
        return freq / factor
    s = (orig / wavelen - low) / (high - low)
    return (1 - s) * freq / factor + s * freq


def angles(head_dim: int, theta: float, positions, scaling=None, factors=None) -> np.ndarray:
    freqs = []
    for j in range(head_dim // 2):
        f = 1.0 / theta ** (2 * j / head_dim)
        if scaling is not None:
            f = llama31_freq(f, *scaling)
        if factors is not None:
            f /= factors[j]
        freqs.append(f)
    return np.outer(np.asarray(positions, np.float64), freqs)


def assert_table(cos, sin, ang):
    tol = 1e-6 + 2e-7 * np.abs(ang)  # the table rounds pos * freq to float32 (as dllama and HF do)
    assert np.all(np.abs(cos - np.cos(ang)) <= tol) and np.all(np.abs(sin - np.sin(ang)) <= tol)


def test_rope_table_plain():
    cos, sin = K.rope_table(64, 100000.0, False, None, None, 300)
    assert cos.shape == sin.shape == (300, 32) and cos.dtype == np.float32
    assert_table(cos, sin, angles(64, 100000.0, range(300)))
    assert np.array_equal(cos[0], np.ones(32)) and np.array_equal(sin[0], np.zeros(32))


def test_rope_table_llama31_scaling_and_freq_factors():
    scaling = (8.0, 1.0, 4.0, 8192)  # Llama 3.1's published values
    cos, sin = K.rope_table(128, 500000.0, False, scaling, None, 64)
    ang = angles(128, 500000.0, range(64), scaling)
    assert_table(cos, sin, ang)
    # the rule really changed something: low frequencies divided by 8, the highest kept
    plain = angles(128, 500000.0, range(64))
    assert np.isclose(ang[1, 0], plain[1, 0]) and np.isclose(ang[1, -1], plain[1, -1] / 8)
    mid = [not np.isclose(a, p) and not np.isclose(a, p / 8) for a, p in zip(ang[1], plain[1], strict=True)]
    assert any(mid)
    factors = np.linspace(1.0, 4.0, 8).astype(np.float32)
    cos, sin = K.rope_table(16, 10000.0, True, (1.0, 1.0, 4.0, 8192), factors, 40)
    assert_table(cos, sin, angles(16, 10000.0, range(40), None, factors.astype(np.float64)))
    with pytest.raises(DllamaError, match="rope_freqs"):
        K.rope_table(16, 10000.0, True, None, factors[:3], 40)


@pytest.mark.parametrize("neox", [False, True])
@pytest.mark.parametrize("batch", [1, 7])
def test_rope_rotates_the_right_pairs(neox, batch, rng):
    head_dim, n_heads = 16, 3
    cos, sin = K.rope_table(head_dim, 10000.0, neox, None, None, 100)
    positions = rng.integers(0, 100, batch).astype(np.int32)
    x = rng.standard_normal((batch, n_heads * head_dim)).astype(np.float32)
    expect = x.astype(np.float64).reshape(batch, n_heads, head_dim).copy()
    ang = angles(head_dim, 10000.0, positions)[:, None, :]  # (B, 1, half)
    if neox:
        a, b = expect[..., : head_dim // 2].copy(), expect[..., head_dim // 2 :].copy()
        expect[..., : head_dim // 2] = a * np.cos(ang) - b * np.sin(ang)
        expect[..., head_dim // 2 :] = a * np.sin(ang) + b * np.cos(ang)
    else:
        a, b = expect[..., 0::2].copy(), expect[..., 1::2].copy()
        expect[..., 0::2] = a * np.cos(ang) - b * np.sin(ang)
        expect[..., 1::2] = a * np.sin(ang) + b * np.cos(ang)
    K.rope(x, positions, cos, sin, head_dim, neox)
    assert np.allclose(x, expect.reshape(batch, -1), rtol=1e-5, atol=1e-5)


def test_rope_rejects_position_past_table(rng):
    cos, sin = K.rope_table(16, 10000.0, False, None, None, 10)
    with pytest.raises(DllamaError, match="position 10"):
        K.rope(np.zeros((1, 32), np.float32), np.array([10], np.int32), cos, sin, 16, False)


# ----------------------------------------------------------------------------------------------------------
# attention
# ----------------------------------------------------------------------------------------------------------


def attention_reference(q, kc, vc, positions, n_heads, n_kv, head_dim, group=None, q_offset=0):
    out = np.zeros(q.shape)
    group = group or n_heads // n_kv
    for b, pos in enumerate(positions):
        for h in range(n_heads):
            kvh = (q_offset + h) // group
            qh = q[b, h * head_dim : (h + 1) * head_dim].astype(np.float64)
            k = kc[: pos + 1, kvh * head_dim : (kvh + 1) * head_dim].astype(np.float64)
            v = vc[: pos + 1, kvh * head_dim : (kvh + 1) * head_dim].astype(np.float64)
            s = k @ qh / math.sqrt(head_dim)
            a = np.exp(s - s.max())
            out[b, h * head_dim : (h + 1) * head_dim] = (a / a.sum()) @ v
    return out


@pytest.mark.parametrize("n_heads,n_kv", [(9, 3), (5, 5), (6, 2), (4, 1)])
@pytest.mark.parametrize("batch,start", [(1, 0), (1, 41), (7, 13), (7, 600)])
def test_attention(n_heads, n_kv, batch, start, rng):
    head_dim, max_seq = 16, 700
    q = rng.standard_normal((batch, n_heads * head_dim)).astype(np.float32)
    kc = (rng.standard_normal((max_seq, n_kv * head_dim)) * 2).astype(np.float32)
    vc = rng.standard_normal((max_seq, n_kv * head_dim)).astype(np.float32)
    positions = np.arange(start, start + batch, dtype=np.int32)  # prefill batch: row b sees 0..start+b
    out = np.full_like(q, np.nan)
    scratch = np.zeros((batch * n_heads, max_seq), np.float32)
    K.attention(q, kc, vc, positions, n_heads, n_kv, head_dim, out, scratch)
    expect = attention_reference(q, kc, vc, positions, n_heads, n_kv, head_dim)
    assert np.allclose(out, expect, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize(
    "n_heads,n_kv,group,q_offset",
    [(4, 2, 3, 2), (1, 1, 3, 1), (2, 1, 3, 0), (7, 3, 3, 1), (3, 2, 2, 1)],
)
@pytest.mark.parametrize("batch,start", [(1, 41), (7, 600)])
def test_attention_of_heads_inside_groups(n_heads, n_kv, group, q_offset, batch, start, rng):
    """A node beyond the KV-head count holds query heads that start inside a GQA group: local head h reads
    local KV head (q_offset + h) // group."""
    head_dim, max_seq = 16, 700
    q = rng.standard_normal((batch, n_heads * head_dim)).astype(np.float32)
    kc = (rng.standard_normal((max_seq, n_kv * head_dim)) * 2).astype(np.float32)
    vc = rng.standard_normal((max_seq, n_kv * head_dim)).astype(np.float32)
    positions = np.arange(start, start + batch, dtype=np.int32)
    out, scratch = np.full_like(q, np.nan), np.zeros((batch * n_heads, max_seq), np.float32)
    K.attention(q, kc, vc, positions, n_heads, n_kv, head_dim, out, scratch, group, q_offset)
    expect = attention_reference(q, kc, vc, positions, n_heads, n_kv, head_dim, group, q_offset)
    assert np.allclose(out, expect, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("n_heads,n_kv,group,q_offset", [(4, 1, 3, 2), (4, 3, 3, 0), (2, 1, 3, 3)])
def test_attention_refuses_heads_that_miss_the_cache(n_heads, n_kv, group, q_offset):
    """Query heads that read past the cache's KV heads, leave one unread, or an offset beyond the group."""
    q = np.zeros((1, n_heads * 16), np.float32)
    cache, scratch = np.zeros((8, n_kv * 16), np.float32), np.zeros((n_heads, 8), np.float32)
    with pytest.raises(DllamaError, match="attention shapes disagree"):
        K.attention(
            q, cache, cache, np.zeros(1, np.int32), n_heads, n_kv, 16, q.copy(), scratch, group, q_offset
        )


def test_kv_store(rng):
    kc, vc = np.zeros((10, 24), np.float32), np.zeros((10, 24), np.float32)
    k, v = rng.standard_normal((3, 24)).astype(np.float32), rng.standard_normal((3, 24)).astype(np.float32)
    K.kv_store(kc, vc, np.array([4, 5, 9], np.int32), k, v)
    assert np.array_equal(kc[[4, 5, 9]], k) and np.array_equal(vc[[4, 5, 9]], v)
    assert not kc[[0, 1, 2, 3, 6, 7, 8]].any() and not vc[[0, 1, 2, 3, 6, 7, 8]].any()
    with pytest.raises(DllamaError, match="position 10"):
        K.kv_store(kc, vc, np.array([10], np.int32), k[:1], v[:1])


def test_attention_rejects_position_past_cache(rng):
    q = np.zeros((1, 32), np.float32)
    cache, scratch = np.zeros((8, 32), np.float32), np.zeros((2, 9), np.float32)
    with pytest.raises(DllamaError, match="position 8"):
        K.attention(q, cache, cache, np.array([8], np.int32), 2, 2, 16, q.copy(), scratch)


# ----------------------------------------------------------------------------------------------------------
# mixture of experts
# ----------------------------------------------------------------------------------------------------------


def route_reference(logits: np.ndarray, k: int, normalize: bool) -> tuple[np.ndarray, np.ndarray]:
    """float64 softmax; the k largest probabilities, ties to the lower expert; optionally renormalised."""
    z = logits.astype(np.float64)
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    idx = np.stack([np.lexsort((np.arange(p.shape[1]), -row))[:k] for row in p])
    w = np.take_along_axis(p, idx, axis=1)
    return idx, w / w.sum(axis=1, keepdims=True) if normalize else w


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("batch,experts,k", [(1, 8, 2), (5, 60, 4), (3, 128, 8), (2, 4, 4)])
def test_moe_route(batch, experts, k, normalize, rng):
    logits = (rng.standard_normal((batch, experts)) * 3).astype(np.float32)
    idx, w = np.full((batch, k), -7, np.int32), np.full((batch, k), np.nan, np.float32)
    K.moe_route(logits, k, normalize, idx, w)
    want_idx, want_w = route_reference(logits, k, normalize)
    assert np.array_equal(idx, want_idx)
    assert np.allclose(w, want_w, rtol=1e-6, atol=1e-9)


def test_moe_route_ties_go_to_the_lower_expert():
    logits = np.array([[1.0, 3.0, 3.0, 0.0, 3.0], [2.0, 2.0, 2.0, 2.0, 2.0]], np.float32)
    idx, w = np.empty((2, 2), np.int32), np.empty((2, 2), np.float32)
    K.moe_route(logits, 2, True, idx, w)
    assert idx.tolist() == [[1, 2], [0, 1]]
    assert np.array_equal(w, np.full((2, 2), 0.5, np.float32))
    K.moe_route(logits, np.int64(2), False, idx, w)  # k as a config may hold it
    assert np.allclose(w[1], [0.2, 0.2])


def test_moe_route_rejects_bad_shapes():
    logits = np.zeros((2, 8), np.float32)
    good_idx, good_w = np.empty((2, 2), np.int32), np.empty((2, 2), np.float32)
    for args in (
        (0, good_idx[:, :0], good_w[:, :0]),
        (9, np.empty((2, 9), np.int32), np.empty((2, 9), np.float32)),
        (2, good_idx.astype(np.int64), good_w),
        (2, good_idx, good_w[:1]),
    ):
        with pytest.raises(DllamaError, match="moe_route shapes disagree"):
            K.moe_route(logits, args[0], True, args[1], args[2])


def expert_stack(wtype: str, experts: int, rows: int, cols: int, rng, strided: bool) -> np.ndarray:
    """(E, rows, n) native weights; strided puts other bytes between the experts, as a .m file does."""
    stack = np.stack([random_weight(wtype, rows, cols, rng) for _ in range(experts)])
    if not strided:
        return stack
    room = np.zeros((experts, 3, *stack.shape[1:]), stack.dtype)
    room[:, 1] = stack
    return room[:, 1]


def moe_reference(
    stack: np.ndarray, wtype: str, x: np.ndarray, idx: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """float64 out[b, s*rows:(s+1)*rows] = W[idx[b, s]] @ x_{b,s}, and the same bound as tolerance()."""
    wf = np.stack([decode(m, wtype) for m in stack])
    n_b, k = idx.shape
    cols = wf.shape[2]
    out, bound = np.zeros((n_b, k * wf.shape[1])), np.zeros((n_b, k * wf.shape[1]))
    for b in range(n_b):
        for s in range(k):
            xs = x[b, s * cols : (s + 1) * cols] if x.shape[1] > cols else x[b]
            out[b, s * wf.shape[1] : (s + 1) * wf.shape[1]] = wf[idx[b, s]] @ xs
            bound[b, s * wf.shape[1] : (s + 1) * wf.shape[1]] = np.abs(wf[idx[b, s]]) @ np.abs(xs)
    return out, 1e-5 * bound + 1e-30


@pytest.mark.parametrize("wtype", FLOAT + QUANT)
@pytest.mark.parametrize("q80x", [False, True])
def test_moe_matmul_routes_each_slot_to_its_expert(wtype, q80x, rng):
    experts, rows, k, cols = 5, 13, 3, 2 * unit(wtype)
    for strided in (False, True):
        stack = expert_stack(wtype, experts, rows, cols, rng, strided)
        for batch, per_slot in ((1, False), (1, True), (4, False), (4, True)):
            idx = rng.integers(0, experts, (batch, k)).astype(np.int32)
            idx[0, :2] = [4, 4] if batch == 1 else idx[0, :2]  # one expert in two slots of a token
            x = rng.standard_normal((batch, k * cols if per_slot else cols)).astype(np.float32)
            out = np.full((batch, k * rows), np.nan, np.float32)
            if q80x:
                xq = q80_reference(x)
                K.moe_matmul_q80(stack, wtype, xq, idx, out)
                x = decode(xq, "q80")
            else:
                K.moe_matmul(stack, wtype, x, idx, out)
            expect, tol = moe_reference(stack, wtype, x, idx)
            assert np.all(np.abs(out - expect) <= tol), (strided, batch, per_slot)


def test_moe_matmul_rejects_bad_experts_and_shapes(rng):
    stack = expert_stack("q4k", 4, 8, 256, rng, strided=False)
    x, out = np.zeros((2, 256), np.float32), np.zeros((2, 16), np.float32)
    for bad in (4, -1):
        idx = np.array([[0, 1], [bad, 2]], np.int32)
        with pytest.raises(DllamaError, match=f"expert index {bad} is outside the 4 experts"):
            K.moe_matmul(stack, "q4k", x, idx, out)
    idx = np.zeros((2, 2), np.int32)
    for args in (
        (np.zeros((2, 300), np.float32), idx, out),
        (x, idx.astype(np.int64), out),
        (x, idx, np.zeros((2, 8), np.float32)),
        (np.zeros((2, 256), np.uint8), idx, out),
    ):
        with pytest.raises(DllamaError, match="moe_matmul shapes disagree"):
            K.moe_matmul(stack, "q4k", *args)
    with pytest.raises(DllamaError, match="moe_matmul_q80 shapes disagree"):
        K.moe_matmul_q80(stack, "q4k", np.zeros((2, 256), np.uint8), idx, out)
    with pytest.raises(DllamaError, match="3-D"):
        K.moe_matmul(stack[0], "q4k", x, idx, out)


def test_moe_sum_adds_the_weighted_slots_in_slot_order(rng):
    batch, k, n = 3, 4, 40
    ys = rng.standard_normal((batch, k * n)).astype(np.float32)
    w = rng.uniform(0, 1, (batch, k)).astype(np.float32)
    out = np.full((batch, n), np.nan, np.float32)
    K.moe_sum(ys, w, out)
    expect = np.zeros((batch, n), np.float32)
    for s in range(k):  # float32 products added one slot after another
        expect = expect + w[:, s : s + 1] * ys[:, s * n : (s + 1) * n]
    assert np.array_equal(out, expect)
    exact = np.einsum("bs,bsn->bn", w.astype(np.float64), ys.reshape(batch, k, n).astype(np.float64))
    assert np.allclose(out, exact, rtol=1e-5, atol=1e-6)
    with pytest.raises(DllamaError, match="moe_sum shapes disagree"):
        K.moe_sum(ys[:, :-1], w, out)


# ----------------------------------------------------------------------------------------------------------
# the embedded model's real tensors (read-only memory maps), against gguf's own de-quantiser
# ----------------------------------------------------------------------------------------------------------


def test_real_smollm2_tensors(smollm2_path, rng):
    from engine.gguf_file import load_gguf

    model = load_gguf(smollm2_path)
    for name, rows in (("blk.0.ffn_down.weight", None), ("token_embd.weight", 3000)):
        w = model.weights[name]
        data = w.data[:rows] if rows else w.data
        wf = decode(np.asarray(data), w.dtype)
        x = rng.standard_normal((2, w.cols)).astype(np.float32)
        for batch in (1, 2):
            out = np.empty((batch, data.shape[0]), np.float32)
            K.matmul(data, w.dtype, x[:batch], out)
            assert np.all(np.abs(out - x[:batch] @ wf.T) <= tolerance(x[:batch], wf))
    emb = model.weights["token_embd.weight"]
    tokens = np.array([0, 1, 2, 49151], np.int32)
    out = np.empty((4, emb.cols), np.float32)
    K.embedding(emb.data, emb.dtype, tokens, out)
    assert np.array_equal(out, decode(np.asarray(emb.data[tokens]), emb.dtype))


@pytest.mark.parametrize("wtype", ["q40", "q41", "q50", "q51", "q80", "q6k", "f16"])
def test_bound_matmuls_of_one_input_match_float64(wtype, rng):
    """bind_matmuls: three matrices of one float32 input, decode (one launch for block types) and a batch."""
    cols = unit(wtype) * 2
    ws = [random_weight(wtype, rows, cols, rng) for rows in (37, 5, 12)]
    x = rng.standard_normal((3, cols)).astype(np.float32)
    outs = [np.full((3, w.shape[0]), np.nan, np.float32) for w in ws]
    step = K.bind_matmuls([(w, wtype) for w in ws], x, outs)
    for n in (1, 3):
        step(n)
        for w, out in zip(ws, outs, strict=True):
            wf = decode(w, wtype)
            assert np.all(np.abs(out[:n] - x[:n] @ wf.T) <= tolerance(x[:n], wf))


def test_bound_steps_check_positions_on_every_call():
    """Bound rope / kv_store / attention steps raise the public functions' errors for a bad position."""
    cos, sin = K.rope_table(8, 10000.0, False, None, None, 4)
    x, pos = np.zeros((2, 16), np.float32), np.zeros(2, np.int32)
    rope = K.bind_rope(x, pos, cos, sin, 8, False)
    rope(2)
    pos[1] = 4
    with pytest.raises(DllamaError, match="position 4 is beyond the RoPE table"):
        rope(2)
    kc, vc = np.zeros((4, 16), np.float32), np.zeros((4, 16), np.float32)
    store = K.bind_kv_store(kc, vc, pos, x, x)
    with pytest.raises(DllamaError, match="position 4 is outside the KV cache"):
        store(2)
    attend = K.bind_attention(x, kc, vc, pos, 2, 2, 8, np.zeros_like(x), np.zeros((4, 4), np.float32), 1, 0)
    with pytest.raises(DllamaError, match="position 4 is outside the KV cache"):
        attend(2)
    pos[1] = 1  # in range again: no error
    x[1] = 1.5
    store(2)
    attend(2)
    assert np.array_equal(kc[1], x[1])


def test_fused_rope_kv_store_checks_positions_and_slots():
    """The fused rope + rope + kv_store step: rotates q and k as two rope steps do, stores k and v in the
    rows of each row's slot, and raises the unfused steps' errors for a bad position or slot."""
    cos, sin = K.rope_table(8, 10000.0, False, None, None, 8)
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 16)).astype(np.float32) for _ in range(3))
    pos, slot = np.array([3, 1], np.int32), np.array([[1], [0]], np.int32)
    kc, vc = np.zeros((2 * 4, 16), np.float32), np.zeros((2 * 4, 16), np.float32)
    want_q, want_k = q.copy(), k.copy()
    K.rope(want_q, pos, cos, sin, 8, False)
    K.rope(want_k, pos, cos, sin, 8, False)
    step = K.bind_rope_kv_store(q, k, v, pos, cos, sin, 8, False, kc, vc, (slot, 2, 4))
    step(2)
    assert np.array_equal(q, want_q) and np.array_equal(k, want_k)
    assert np.array_equal(kc[4 + 3], want_k[0]) and np.array_equal(vc[4 + 3], v[0])  # slot 1, position 3
    assert np.array_equal(kc[1], want_k[1]) and np.array_equal(vc[1], v[1])  # slot 0, position 1
    assert np.count_nonzero(kc.any(axis=1)) == 2
    pos[0] = 4  # inside the RoPE table (8 positions) but past a slot's 4 rows
    with pytest.raises(DllamaError, match="position 4 is outside the KV cache"):
        step(2)
    pos[0] = 8
    with pytest.raises(DllamaError, match="position 8 is beyond the RoPE table"):
        step(2)
    pos[0], slot[1] = 0, 2
    with pytest.raises(DllamaError, match="a KV slot outside 0..1"):
        step(2)
