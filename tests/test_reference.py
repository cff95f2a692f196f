"""Validates the float64 reference forward against the golden logits, hand-computed Q80 values and
equivalences between RoPE conventions on tiny synthetic GGUF files."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from reference import load_ref_model, q80_roundtrip, ref_forward

DIM, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, VOCAB, LAYERS = 64, 96, 4, 2, 16, 48, 2
TOKENS = [3, 17, 5, 40, 22, 9, 31, 1]


@pytest.fixture(scope="module")
def smollm2(smollm2_path: Path):
    return load_ref_model(smollm2_path)


@pytest.fixture(scope="module")
def golden(shared: Path):
    return np.load(shared / "smollm2_golden.npz")


@pytest.mark.slow
@pytest.mark.parametrize("case", [0, 2])
def test_golden_last_logits_and_greedy(smollm2, golden, case):
    logits = ref_forward(smollm2, golden[f"case{case}_prompt_ids"].tolist())
    assert logits.shape == (len(golden[f"case{case}_prompt_ids"]), 49152)
    assert np.abs(logits[-1] - golden[f"case{case}_last_logits"]).max() < 1e-3
    assert int(np.argmax(logits[-1])) == int(golden[f"case{case}_greedy_ids"][0])


@pytest.mark.slow
def test_q80_mode_within_tolerance_of_golden(smollm2, golden):
    want = golden["case0_last_logits"]
    got = ref_forward(smollm2, golden["case0_prompt_ids"].tolist(), q80=True)[-1]
    err = np.abs(got - want)
    assert err.mean() <= 0.5
    assert err.max() > 1e-3  # the activations really went through 8 bits
    assert int(np.argmax(got)) == int(np.argmax(want))


def test_q80_roundtrip_hand_values():
    exact = np.zeros(32)  # amax 7.9375 -> d = 1/16 exactly; ties round to even
    exact[:5] = [7.9375, 1.5 / 16, 0.5 / 16, -2.5 / 16, -3.5 / 16]
    want_exact = np.zeros(32)
    want_exact[:5] = [127 / 16, 2 / 16, 0.0, -2 / 16, -4 / 16]
    rounded = np.zeros(32)  # amax 1 -> d = 1/127, stored as fp16 2^-7 * (1 + 8/1024)
    rounded[0] = 1.0
    out = q80_roundtrip(np.stack([exact, rounded, np.zeros(32)]))
    np.testing.assert_array_equal(out[0], want_exact)
    assert out[1, 0] == 127 * 2.0**-7 * (1 + 8 / 1024)
    np.testing.assert_array_equal(out[2], 0.0)
    with pytest.raises(ValueError, match="divisible by 32"):
        q80_roundtrip(np.ones(48))


def _weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = {
        "token_embd.weight": rng.normal(0, 1, (VOCAB, DIM)),
        "output_norm.weight": 1 + 0.1 * rng.normal(size=DIM),
    }
    q_dim, kv_dim = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    shapes = {
        "attn_q": (q_dim, DIM), "attn_k": (kv_dim, DIM), "attn_v": (kv_dim, DIM), "attn_output": (DIM, q_dim),
        "ffn_gate": (HIDDEN, DIM), "ffn_up": (HIDDEN, DIM), "ffn_down": (DIM, HIDDEN),
    }
    for layer in range(LAYERS):
        for name, shape in shapes.items():
            w[f"blk.{layer}.{name}.weight"] = rng.normal(0, shape[1] ** -0.5, shape)
        for name in ("attn_norm", "ffn_norm"):
            w[f"blk.{layer}.{name}.weight"] = 1 + 0.1 * rng.normal(size=DIM)
    return w


def _write(path: Path, arch: str, weights: dict[str, np.ndarray], keys: dict | None = None) -> Path:
    """A tiny GGUF with float32 tensors; keys maps '{arch}.'-relative names to str, int or float values."""
    wr = gguf.GGUFWriter(str(path), arch)
    wr.add_block_count(LAYERS)
    wr.add_embedding_length(DIM)
    wr.add_feed_forward_length(HIDDEN)
    wr.add_head_count(HEADS)
    wr.add_head_count_kv(KV_HEADS)
    wr.add_layer_norm_rms_eps(1e-6)
    wr.add_rope_freq_base(10000.0)
    for key, value in (keys or {}).items():
        add = {str: wr.add_string, int: wr.add_uint32, float: wr.add_float32}[type(value)]
        add(f"{arch}.{key}", value)
    for name, arr in weights.items():
        wr.add_tensor(name, arr.astype(np.float32))
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    return path


def test_neox_with_half_split_rows_and_qk_norm_equals_interleaved(tmp_path):
    w = _weights()
    rng = np.random.default_rng(7)
    for layer in range(LAYERS):
        w[f"blk.{layer}.attn_q_norm.weight"] = 1 + 0.2 * rng.normal(size=HEAD_DIM)
        w[f"blk.{layer}.attn_k_norm.weight"] = 1 + 0.2 * rng.normal(size=HEAD_DIM)
    want = ref_forward(load_ref_model(_write(tmp_path / "llama.gguf", "llama", w)), TOKENS)
    half_split = np.concatenate([np.arange(0, HEAD_DIM, 2), np.arange(1, HEAD_DIM, 2)])
    neox = dict(w)
    for layer in range(LAYERS):
        p = f"blk.{layer}."
        for name, heads, scale in (("attn_q", HEADS, 2.0), ("attn_k", KV_HEADS, 4.0)):
            rows = (np.arange(heads)[:, None] * HEAD_DIM + half_split[None, :]).ravel()
            neox[p + name + ".weight"] = scale * w[p + name + ".weight"][rows]  # per-head norm removes scale
            neox[p + name + "_norm.weight"] = w[p + name + "_norm.weight"][half_split]
    got = ref_forward(load_ref_model(_write(tmp_path / "qwen3.gguf", "qwen3", neox)), TOKENS)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)  # the norm's eps is not quite scale-free
    plain = dict(w)
    for layer in range(LAYERS):
        del plain[f"blk.{layer}.attn_q_norm.weight"], plain[f"blk.{layer}.attn_k_norm.weight"]
    unnormed = ref_forward(load_ref_model(_write(tmp_path / "plain.gguf", "llama", plain)), TOKENS)
    assert np.abs(unnormed - want).max() > 1e-2


def test_llama3_scaling_keys_equal_rope_freqs_tensor(tmp_path):
    factor, low, high, orig = 8.0, 1.0, 4.0, 64
    scaled_keys = {
        "rope.scaling.type": "llama3", "rope.scaling.factor": factor, "rope.scaling.low_freq_factor": low,
        "rope.scaling.high_freq_factor": high, "rope.scaling.original_context_length": orig,
    }
    w = _weights(1)
    by_keys = ref_forward(load_ref_model(_write(tmp_path / "keys.gguf", "llama", w, scaled_keys)), TOKENS)
    divisors = []  # llama.cpp's converter: per-pair divisor of the frequency
    for i in range(HEAD_DIM // 2):
        wavelen = 2 * np.pi * 10000.0 ** (2 * i / HEAD_DIM)
        if wavelen < orig / high:
            divisors.append(1.0)
        elif wavelen > orig / low:
            divisors.append(factor)
        else:
            smooth = (orig / wavelen - low) / (high - low)
            divisors.append(1 / ((1 - smooth) / factor + smooth))
    assert 1.0 < divisors[1] < factor  # the tiny head has pairs in all three bands
    with_tensor = {**w, "rope_freqs.weight": np.array(divisors)}
    tensor_model = load_ref_model(_write(tmp_path / "freqs.gguf", "llama", with_tensor))
    np.testing.assert_allclose(ref_forward(tensor_model, TOKENS), by_keys, rtol=0, atol=1e-5)
    unscaled = ref_forward(load_ref_model(_write(tmp_path / "plain.gguf", "llama", w)), TOKENS)
    assert np.abs(unscaled - by_keys).max() > 1e-3


@pytest.mark.parametrize(
    ("qtype", "tol"),
    [("F32", 0), ("F16", 1e-3), ("BF16", 1e-2), ("Q8_0", 2e-2), ("Q4_1", 0.2), ("Q4_0", 0.3)],
)
def test_loads_each_tensor_type_in_row_order(tmp_path, qtype, tol):
    w = _weights(2)
    qt = gguf.GGMLQuantizationType[qtype]
    wr = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    wr.add_block_count(LAYERS)
    wr.add_embedding_length(DIM)
    wr.add_head_count(HEADS)
    wr.add_layer_norm_rms_eps(1e-6)
    up = w["blk.0.ffn_up.weight"].astype(np.float32)  # 96 rows x 64 columns
    wr.add_tensor("blk.0.ffn_up.weight", gguf.quants.quantize(up, qt), raw_dtype=qt)
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    m = load_ref_model(tmp_path / "t.gguf")
    got = m.weights["blk.0.ffn_up.weight"]
    assert got.dtype == np.float64 and got.shape == (HIDDEN, DIM)
    assert np.abs(got - up).max() <= tol
    assert (m.n_kv_heads, m.head_dim, m.rope_theta) == (HEADS, DIM // HEADS, 10000.0)
