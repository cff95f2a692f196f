"""CPU kernels against independent float64 numpy computations; block layouts are decoded here, not by K."""

from __future__ import annotations

import math

import numba
import numpy as np
import pytest
from gguf.quants import GGMLQuantizationType, dequantize, quantize

from cpu_fallback import kernels as K
from engine.errors import DllamaError

BLOCK_BYTES = {"q40": 18, "q41": 20, "q80": 34}
QUANT = ("q40", "q41", "q80")
FLOAT = ("f32", "f16", "bf16")
GGML = {"q40": GGMLQuantizationType.Q4_0, "q41": GGMLQuantizationType.Q4_1, "q80": GGMLQuantizationType.Q8_0}


# ----------------------------------------------------------------------------------------------------------
# independent references
# ----------------------------------------------------------------------------------------------------------

def f16_at(blocks: np.ndarray, at: int) -> np.ndarray:
    """The fp16 stored at byte `at` of every block, as float64 (blocks: uint8 (..., block_bytes))."""
    return np.ascontiguousarray(blocks[..., at:at + 2]).view(np.float16)[..., 0].astype(np.float64)


def decode(data: np.ndarray, wtype: str) -> np.ndarray:
    """float64 (rows, cols) values of a weight in its native layout, decoded from the documented formats."""
    if wtype == "f32" or wtype == "f16":
        return data.astype(np.float64)
    if wtype == "bf16":
        return (data.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    rows = data.shape[0]
    blocks = data.reshape(rows, -1, BLOCK_BYTES[wtype])
    d = f16_at(blocks, 0)[..., None]
    if wtype == "q80":
        vals = d * blocks[..., 2:].view(np.int8).astype(np.float64)
    else:
        qs = blocks[..., 4:] if wtype == "q41" else blocks[..., 2:]
        nib = np.concatenate([qs & 15, qs >> 4], axis=-1).astype(np.float64)  # byte j: element j and j+16
        vals = d * nib + f16_at(blocks, 2)[..., None] if wtype == "q41" else d * (nib - 8)
    return vals.reshape(rows, -1)


def random_weight(wtype: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """A weight in its native layout: random codes, realistic fp16 scales (positive d, any-sign m for q41)."""
    if wtype == "f32":
        return rng.standard_normal((rows, cols)).astype(np.float32)
    if wtype == "f16":
        return rng.standard_normal((rows, cols)).astype(np.float16)
    if wtype == "bf16":
        return (rng.standard_normal((rows, cols)).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    nb, bb = cols // 32, BLOCK_BYTES[wtype]
    blocks = rng.integers(0, 256, (rows, nb, bb), dtype=np.uint8)
    blocks[..., 0:2] = (rng.uniform(0.001, 0.05, (rows, nb, 1)).astype(np.float16)).view(np.uint8)
    if wtype == "q41":
        blocks[..., 2:4] = (rng.uniform(-0.4, 0.1, (rows, nb, 1)).astype(np.float16)).view(np.uint8)
    return blocks.reshape(rows, nb * bb)


def q80_reference(x: np.ndarray) -> np.ndarray:
    """Spec 2.2 in numpy float32: d = amax/127, q = round-half-even(x * (1/d)), d stored as fp16."""
    blocks = x.astype(np.float32).reshape(x.shape[0], -1, 32)
    d = np.abs(blocks).max(axis=-1, keepdims=True) / np.float32(127)
    safe = np.where(d == 0, np.float32(1), d)
    inv = np.where(d == 0, np.float32(0), np.float32(1) / safe).astype(np.float32)
    q = np.rint(blocks * inv).astype(np.int8)
    out = np.concatenate([d.astype(np.float16).view(np.uint8), q.view(np.uint8)], axis=-1)
    return out.reshape(x.shape[0], -1)


def q80_codes(xq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fp16 scale per block as float64 (B, nb), int codes as float64 (B, nb, 32)) of Q80 rows."""
    blocks = xq.reshape(xq.shape[0], -1, 34)
    return f16_at(blocks, 0), blocks[..., 2:].view(np.int8).astype(np.float64)


def tolerance(x: np.ndarray, w: np.ndarray, rel: float = 1e-5) -> np.ndarray:
    """Allowed |error| of x @ w.T: rel times the sum of |products| (a float32 accumulation bound)."""
    return rel * (np.abs(x) @ np.abs(w).T) + 1e-30


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


# ----------------------------------------------------------------------------------------------------------
# block codec
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("wtype", QUANT)
def test_test_decoder_agrees_with_gguf(wtype, rng):
    w = random_weight(wtype, 3, 64, rng)
    assert np.array_equal(decode(w, wtype), dequantize(w, GGML[wtype]).astype(np.float64))


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
        expect = expect + decode(slices[:, s * 68:(s + 1) * 68], "q80").astype(np.float32)
    K.merge_add_q80(x, slices)
    assert np.array_equal(x, expect)


# ----------------------------------------------------------------------------------------------------------
# matmul
# ----------------------------------------------------------------------------------------------------------

SHAPES = [(1, 32), (5, 96), (37, 64), (130, 256)]
# float weights also get a row length that is not a multiple of the 8-lane vectors
MATMUL_CASES = [(t, r, c) for t in QUANT + FLOAT for r, c in SHAPES] + [(t, 9, 67) for t in FLOAT]


@pytest.mark.parametrize("wtype,rows,cols", MATMUL_CASES)
@pytest.mark.parametrize("batch", [1, 2, 7])
def test_matmul_matches_float64(wtype, batch, rows, cols, rng):
    w = random_weight(wtype, rows, cols, rng)
    x = rng.standard_normal((batch, cols)).astype(np.float32)
    out = np.full((batch, rows), np.nan, np.float32)
    K.matmul(w, wtype, x, out)
    wf = decode(w, wtype)
    expect = x.astype(np.float64) @ wf.T
    assert np.all(np.abs(out - expect) <= tolerance(x, wf))


def q80_matmul_reference(w: np.ndarray, wtype: str, xq: np.ndarray) -> np.ndarray:
    """Per block: d_w*d_x*sum(qw*qx) (+ m_w*d_x*sum(qx) for q41) from the integer codes, in float64."""
    dx, qx = q80_codes(xq)  # (B, nb), (B, nb, 32)
    blocks = w.reshape(w.shape[0], -1, BLOCK_BYTES[wtype])
    dw = f16_at(blocks, 0)  # (rows, nb)
    if wtype == "q80":
        qw = blocks[..., 2:].view(np.int8).astype(np.float64)
    else:
        qs = blocks[..., 4:] if wtype == "q41" else blocks[..., 2:]
        qw = np.concatenate([qs & 15, qs >> 4], axis=-1).astype(np.float64) - (0 if wtype == "q41" else 8)
    dots = np.einsum("rkj,bkj->brk", qw, qx)  # integer dot per block
    out = np.einsum("brk,rk,bk->br", dots, dw, dx)
    if wtype == "q41":
        out += np.einsum("rk,bk,bk->br", f16_at(blocks, 2), dx, qx.sum(axis=-1))
    return out


@pytest.mark.parametrize("wtype", QUANT)
@pytest.mark.parametrize("batch", [1, 2, 7])
@pytest.mark.parametrize("rows,cols", SHAPES)
def test_matmul_q80_matches_the_integer_block_formula(wtype, batch, rows, cols, rng):
    w = random_weight(wtype, rows, cols, rng)
    x = rng.standard_normal((batch, cols)).astype(np.float32)
    xq = q80_reference(x)
    out = np.full((batch, rows), np.nan, np.float32)
    K.matmul_q80(w, wtype, xq, out)
    expect = q80_matmul_reference(w, wtype, xq)
    assert np.all(np.abs(out - expect) <= tolerance(decode(xq, "q80"), decode(w, wtype)))
    # and it is the product with the de-quantised activations, not with x itself
    assert np.abs(expect - x.astype(np.float64) @ decode(w, wtype).T).max() > 10 * np.abs(out - expect).max()


@pytest.mark.parametrize("wtype", FLOAT)
@pytest.mark.parametrize("batch", [1, 7])
def test_matmul_q80_float_weights_use_dequantised_x(wtype, batch, rng):
    w = random_weight(wtype, 37, 96, rng)
    xq = q80_reference(rng.standard_normal((batch, 96)).astype(np.float32))
    out = np.empty((batch, 37), np.float32)
    K.matmul_q80(w, wtype, xq, out)
    xd, wf = decode(xq, "q80"), decode(w, wtype)
    assert np.all(np.abs(out - xd @ wf.T) <= tolerance(xd, wf))


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


def test_matmul_rejects_bad_input(rng):
    w = random_weight("q41", 8, 64, rng)
    with pytest.raises(DllamaError, match="shapes disagree"):
        K.matmul(w, "q41", np.zeros((1, 32), np.float32), np.zeros((1, 8), np.float32))
    with pytest.raises(DllamaError, match="unknown weight type"):
        K.matmul(w, "q3k", np.zeros((1, 64), np.float32), np.zeros((1, 8), np.float32))
    with pytest.raises(DllamaError, match="shapes disagree"):
        K.matmul_q80(w, "q41", np.zeros((1, 64), np.uint8), np.zeros((1, 8), np.float32))


@pytest.mark.parametrize("bad", [0, -1, 10_000, 1.5])
def test_set_threads_validates(bad):
    with pytest.raises(DllamaError, match="thread count"):
        K.set_threads(bad)


# ----------------------------------------------------------------------------------------------------------
# embedding, norms, elementwise
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("wtype", QUANT + FLOAT)
def test_embedding_rows(wtype, rng):
    w = random_weight(wtype, 50, 96, rng)
    tokens = np.array([3, 49, 0, 3, 17, 8, 22], np.int32)
    out = np.empty((7, 96), np.float32)
    K.embedding(w, wtype, tokens, out)
    expect = decode(w, wtype)[tokens]
    assert np.allclose(out, expect, rtol=1e-6, atol=1e-7)
    K.embedding(w, wtype, tokens[:1].astype(np.int64), out[:1])
    assert np.allclose(out[0], expect[0], rtol=1e-6, atol=1e-7)


def test_embedding_rejects_unknown_token(rng):
    w = random_weight("q80", 10, 32, rng)
    with pytest.raises(DllamaError, match="token id 10 is outside the vocabulary"):
        K.embedding(w, "q80", np.array([2, 10], np.int32), np.empty((2, 32), np.float32))


@pytest.mark.parametrize("batch,n", [(1, 576), (7, 37)])
def test_rmsnorm(batch, n, rng):
    x = rng.standard_normal((batch, n)).astype(np.float32) * 3
    weight = rng.uniform(0.5, 1.5, n).astype(np.float32)
    out = np.empty_like(x)
    K.rmsnorm(x, weight, 1e-5, out)
    x64 = x.astype(np.float64)
    expect = weight * x64 / np.sqrt((x64 * x64).mean(axis=1, keepdims=True) + 1e-5)
    assert np.allclose(out, expect, rtol=1e-5, atol=1e-6)


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
        a, b = expect[..., :head_dim // 2].copy(), expect[..., head_dim // 2:].copy()
        expect[..., :head_dim // 2] = a * np.cos(ang) - b * np.sin(ang)
        expect[..., head_dim // 2:] = a * np.sin(ang) + b * np.cos(ang)
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

def attention_reference(q, kc, vc, positions, n_heads, n_kv, head_dim):
    out = np.zeros(q.shape)
    group = n_heads // n_kv
    for b, pos in enumerate(positions):
        for h in range(n_heads):
            kvh = h // group
            qh = q[b, h * head_dim:(h + 1) * head_dim].astype(np.float64)
            k = kc[:pos + 1, kvh * head_dim:(kvh + 1) * head_dim].astype(np.float64)
            v = vc[:pos + 1, kvh * head_dim:(kvh + 1) * head_dim].astype(np.float64)
            s = k @ qh / math.sqrt(head_dim)
            a = np.exp(s - s.max())
            out[b, h * head_dim:(h + 1) * head_dim] = (a / a.sum()) @ v
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
# the embedded model's real tensors (read-only memory maps), against gguf's own de-quantiser
# ----------------------------------------------------------------------------------------------------------

def test_real_smollm2_tensors(smollm2_path, rng):
    from engine.gguf_file import load_gguf

    model = load_gguf(smollm2_path)
    for name, rows in (("blk.0.ffn_down.weight", None), ("token_embd.weight", 3000)):
        w = model.weights[name]
        data = w.data[:rows] if rows else w.data
        wf = dequantize(np.asarray(data), GGML[w.dtype]).astype(np.float64)
        x = rng.standard_normal((2, w.cols)).astype(np.float32)
        for batch in (1, 2):
            out = np.empty((batch, data.shape[0]), np.float32)
            K.matmul(data, w.dtype, x[:batch], out)
            assert np.all(np.abs(out - x[:batch] @ wf.T) <= tolerance(x[:batch], wf))
    emb = model.weights["token_embd.weight"]
    tokens = np.array([0, 1, 2, 49151], np.int32)
    out = np.empty((4, emb.cols), np.float32)
    K.embedding(emb.data, emb.dtype, tokens, out)
    assert np.array_equal(out, dequantize(np.asarray(emb.data[tokens]), GGML[emb.dtype]))
