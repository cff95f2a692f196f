"""Validates the float64 reference forward against the golden logits, hand-computed Q80 values and routing,
an explicit loop version of the forward pass, equivalences between RoPE conventions and between dense and
expert FFNs; and tests/tinymodel.py's GGUF and .m layouts."""

from __future__ import annotations

import math
import struct
from dataclasses import replace
from pathlib import Path

import gguf
import numpy as np
import pytest
import reference
from reference import RefModel, load_ref_model, moe_route, q80_roundtrip, ref_forward, ref_model
from tinymodel import tiny_weights, write_tiny_gguf, write_tiny_m

from engine.config import RopeScaling

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
        "attn_q": (q_dim, DIM),
        "attn_k": (kv_dim, DIM),
        "attn_v": (kv_dim, DIM),
        "attn_output": (DIM, q_dim),
        "ffn_gate": (HIDDEN, DIM),
        "ffn_up": (HIDDEN, DIM),
        "ffn_down": (DIM, HIDDEN),
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
        "rope.scaling.type": "llama3",
        "rope.scaling.factor": factor,
        "rope.scaling.low_freq_factor": low,
        "rope.scaling.high_freq_factor": high,
        "rope.scaling.original_context_length": orig,
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


# ----------------------------------------------------------------------------------------------------------
# qwen2 / qwen3 / qwen3moe: an explicit per-token, per-head loop version of the forward pass, invariances


def loop_forward(arch: str, w: dict[str, np.ndarray], tokens: list[int], q80: bool, **hp) -> np.ndarray:
    """The forward pass written out token by token, head by head and pair by pair from the model formulas;
    q80 rounds every matmul input except the router's through Q80 (one dllama node's numerics)."""
    n_heads, n_kv, hd, eps, theta = hp["n_heads"], hp["n_kv_heads"], hp["head_dim"], 1e-6, 10000.0
    qz = q80_roundtrip if q80 else (lambda v: v)
    n_layers = sum(1 for name in w if name.endswith("attn_norm.weight"))

    def rmsnorm(v: np.ndarray, g: np.ndarray) -> np.ndarray:
        return g * v / math.sqrt(float(np.dot(v, v)) / len(v) + eps)

    def rotate(v: np.ndarray, pos: int) -> np.ndarray:
        out, half = v.copy(), hd // 2
        for i in range(half):
            c, s = math.cos(pos * theta ** (-2 * i / hd)), math.sin(pos * theta ** (-2 * i / hd))
            a, b = (i, i + half) if arch != "llama" else (2 * i, 2 * i + 1)
            out[a], out[b] = v[a] * c - v[b] * s, v[a] * s + v[b] * c
        return out

    def swiglu(gate: np.ndarray, up: np.ndarray, down: np.ndarray, h: np.ndarray) -> np.ndarray:
        g = gate @ qz(h)
        return down @ qz(g / (1 + np.exp(-g)) * (up @ qz(h)))

    xs = [w["token_embd.weight"][t].copy() for t in tokens]
    for layer in range(n_layers):
        p = f"blk.{layer}."
        keys, values, updates = [], [], []
        for pos, x in enumerate(xs):
            h = rmsnorm(x, w[p + "attn_norm.weight"])
            heads = {}
            for t, count in (("q", n_heads), ("k", n_kv), ("v", n_kv)):
                y = w[f"{p}attn_{t}.weight"] @ qz(h) + w.get(f"{p}attn_{t}.bias", 0.0)
                heads[t] = [y[j * hd : (j + 1) * hd] for j in range(count)]
                if t != "v" and f"{p}attn_{t}_norm.weight" in w:
                    heads[t] = [rmsnorm(v, w[f"{p}attn_{t}_norm.weight"]) for v in heads[t]]
                if t != "v":
                    heads[t] = [rotate(v, pos) for v in heads[t]]
            keys.append(heads["k"])
            values.append(heads["v"])
            out = []
            for j in range(n_heads):
                g = j // (n_heads // n_kv)
                scores = [float(np.dot(heads["q"][j], keys[s][g])) / math.sqrt(hd) for s in range(pos + 1)]
                e = [math.exp(sc - max(scores)) for sc in scores]
                out.append(sum(e[s] / sum(e) * values[s][g] for s in range(pos + 1)))
            updates.append(w[p + "attn_output.weight"] @ qz(np.concatenate(out)))
        xs = [x + u for x, u in zip(xs, updates, strict=True)]
        for i, x in enumerate(xs):
            h = rmsnorm(x, w[p + "ffn_norm.weight"])
            if p + "ffn_gate_inp.weight" not in w:
                xs[i] = x + swiglu(
                    w[p + "ffn_gate.weight"], w[p + "ffn_up.weight"], w[p + "ffn_down.weight"], h
                )
                continue
            logits = w[p + "ffn_gate_inp.weight"] @ h
            prob = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
            chosen = sorted(range(len(prob)), key=lambda e: (-prob[e], e))[: hp["n_active_experts"]]
            total = sum(prob[e] for e in chosen)
            gate, up, down = (w[f"{p}ffn_{t}_exps.weight"] for t in ("gate", "up", "down"))
            xs[i] = x + sum(prob[e] / total * swiglu(gate[e], up[e], down[e], h) for e in chosen)
    classifier = w.get("output.weight", w["token_embd.weight"])
    return np.stack([classifier @ qz(rmsnorm(x, w["output_norm.weight"])) for x in xs])


def tiny_ref(arch: str, seed: int = 0, tied: bool = False, **shape) -> RefModel:
    """A small random RefModel of `arch` straight from tinymodel's weights (no file)."""
    hp = dict(
        dim=8, hidden_dim=5, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=6, n_experts=0, moe_hidden_dim=4
    )
    hp.update(shape)
    if arch == "qwen3moe" and not shape.get("n_experts"):
        hp["n_experts"] = 3
    w = tiny_weights(vocab=7, seed=seed, tied=tied, arch=arch, **hp)
    k = shape.get("n_active_experts", 2) if hp["n_experts"] else 0
    return ref_model(
        arch, w, n_heads=hp["n_heads"], n_kv_heads=hp["n_kv_heads"], head_dim=hp["head_dim"], norm_eps=1e-6,
        rope_theta=10000.0, n_experts=hp["n_experts"], n_active_experts=k,
    )  # fmt: skip


SHORT = [3, 1, 6, 0, 3]


@pytest.mark.parametrize(
    ("arch", "tied", "head_dim"),
    [("llama", False, 4), ("qwen2", False, 4), ("qwen3", True, 6), ("qwen3moe", False, 6)],
)
def test_vectorised_forward_equals_the_explicit_loops(arch: str, tied: bool, head_dim: int) -> None:
    m = tiny_ref(arch, seed=len(arch), tied=tied, head_dim=head_dim)
    assert m.rope_neox == (arch != "llama") and m.head_dim == head_dim
    want = loop_forward(arch, m.weights, SHORT, False, **_loop_hp(m))
    np.testing.assert_allclose(ref_forward(m, SHORT), want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3moe"])
def test_q80_forward_equals_the_explicit_loops(arch: str) -> None:
    m = tiny_ref(arch, seed=9, dim=32, hidden_dim=32, head_dim=16, moe_hidden_dim=32)
    want = loop_forward(arch, m.weights, SHORT, True, **_loop_hp(m))
    np.testing.assert_allclose(ref_forward(m, SHORT, q80=True), want, rtol=0, atol=1e-12)
    assert np.abs(ref_forward(m, SHORT) - want).max() > 1e-4


def _loop_hp(m: RefModel) -> dict[str, int]:
    return dict(
        n_heads=m.n_heads, n_kv_heads=m.n_kv_heads, head_dim=m.head_dim, n_active_experts=m.n_active_experts
    )


def test_moe_route_hand_computed() -> None:
    logits = np.log(
        np.array([[1.0, 2.0, 2.0, 4.0], [3.0, 1.0, 1.0, 1.0]])
    )  # p = [1, 2, 2, 4] / 9, [3, 1, 1, 1] / 6
    idx, weight = moe_route(logits, 2, normalize=False)
    assert idx.tolist() == [[3, 1], [0, 1]]  # ties: the lower expert index first
    np.testing.assert_allclose(weight, [[4 / 9, 2 / 9], [3 / 6, 1 / 6]], rtol=1e-12)
    idx, weight = moe_route(logits, 3, normalize=True)
    assert idx.tolist() == [[3, 1, 2], [0, 1, 2]]
    np.testing.assert_allclose(weight, [[4 / 8, 2 / 8, 2 / 8], [3 / 5, 1 / 5, 1 / 5]], rtol=1e-12)


def _as_experts(
    dense: RefModel, n_experts: int, k: int, normalize: bool, down_scale: float = 1.0
) -> RefModel:
    """dense's FFN as n_experts identical experts behind a zero router (each has p = 1 / n_experts)."""
    w = dict(dense.weights)
    for layer in range(dense.n_layers):
        p = f"blk.{layer}."
        for t in ("gate", "up", "down"):
            w[f"{p}ffn_{t}_exps.weight"] = np.stack([w.pop(f"{p}ffn_{t}.weight")] * n_experts)
        w[p + "ffn_down_exps.weight"] = w[p + "ffn_down_exps.weight"] * down_scale
        w[p + "ffn_gate_inp.weight"] = np.zeros((n_experts, dense.dim))
    return replace(
        dense, arch="qwen3moe", weights=w, n_experts=n_experts, n_active_experts=k, moe_normalize=normalize
    )


def test_moe_with_one_expert_equals_the_dense_ffn() -> None:
    dense = tiny_ref("qwen3", dim=64, hidden_dim=64, n_heads=4, n_kv_heads=2, head_dim=16)
    moe = _as_experts(dense, 1, 1, normalize=False)
    nodes = ([(0, 32), (32, 64)], [(0, 32), (32, 64)])
    for kw in ({}, {"q80": True}, {"q80": True, "node_columns": nodes}):
        np.testing.assert_allclose(ref_forward(moe, SHORT, **kw), ref_forward(dense, SHORT, **kw), atol=1e-12)


def test_moe_routing_weights_scale_the_experts() -> None:
    dense = tiny_ref("qwen3", seed=4)
    normalized = _as_experts(dense, 3, 1, normalize=True)  # one of three equal experts, weight 1/3 -> 1
    np.testing.assert_allclose(ref_forward(normalized, SHORT), ref_forward(dense, SHORT), atol=1e-12)
    raw = _as_experts(dense, 3, 2, normalize=False)  # two of three, each weighted 1/3
    thirds = _as_experts(dense, 1, 1, normalize=False, down_scale=2 / 3)
    np.testing.assert_allclose(ref_forward(raw, SHORT), ref_forward(thirds, SHORT), atol=1e-12)
    assert np.abs(ref_forward(raw, SHORT) - ref_forward(dense, SHORT)).max() > 1e-2


@pytest.mark.parametrize("arch", ["qwen2", "qwen3moe"])
def test_node_partial_sums_add_up_to_the_whole(monkeypatch, arch: str) -> None:
    """With the Q80 round trip switched off, uneven column splits over 3 nodes sum to the 1-node forward."""
    m = tiny_ref(arch, seed=2, dim=64, hidden_dim=96, n_heads=4, n_kv_heads=2, head_dim=16, moe_hidden_dim=96)
    ffn = [(0, 32), (32, 64), (64, 96)]
    nodes = ([(0, 32), (32, 48), (48, 64)], ffn)
    with_rounding = ref_forward(m, SHORT, q80=True, node_columns=nodes)
    one_node = ref_forward(m, SHORT, q80=True)
    assert 1e-6 < np.abs(with_rounding - one_node).max() < 0.05 * np.abs(one_node).max()
    monkeypatch.setattr(reference, "q80_roundtrip", lambda a: a)
    np.testing.assert_allclose(ref_forward(m, SHORT, node_columns=nodes), ref_forward(m, SHORT), atol=1e-12)


def test_qwen2_biases_and_neox_rows_equal_llama_with_interleaved_rows(tmp_path) -> None:
    """Qwen2 through load_ref_model: NeoX RoPE on half-split rows (and biases) equals interleaved RoPE."""
    w = _weights(3)
    rng = np.random.default_rng(8)
    for layer in range(LAYERS):
        for t, n in (("q", HEADS * HEAD_DIM), ("k", KV_HEADS * HEAD_DIM), ("v", KV_HEADS * HEAD_DIM)):
            w[f"blk.{layer}.attn_{t}.bias"] = 0.5 * rng.normal(size=n)
    want = ref_forward(load_ref_model(_write(tmp_path / "llama.gguf", "llama", w)), TOKENS)
    half_split = np.concatenate([np.arange(0, HEAD_DIM, 2), np.arange(1, HEAD_DIM, 2)])
    qwen = dict(w)
    for layer in range(LAYERS):
        for t, heads in (("q", HEADS), ("k", KV_HEADS)):
            rows = (np.arange(heads)[:, None] * HEAD_DIM + half_split[None, :]).ravel()
            for kind in ("weight", "bias"):
                qwen[f"blk.{layer}.attn_{t}.{kind}"] = w[f"blk.{layer}.attn_{t}.{kind}"][rows]
    m = load_ref_model(_write(tmp_path / "qwen2.gguf", "qwen2", qwen))
    assert m.rope_neox
    np.testing.assert_allclose(ref_forward(m, TOKENS), want, rtol=0, atol=1e-9)
    no_bias = {name: t for name, t in w.items() if not name.endswith(".bias")}
    unbiased = ref_forward(load_ref_model(_write(tmp_path / "plain.gguf", "llama", no_bias)), TOKENS)
    assert np.abs(unbiased - want).max() > 1e-2


# ----------------------------------------------------------------------------------------------------------
# tests/tinymodel.py: GGUF layout of each architecture, .m files as the spec lays them out


def test_tiny_qwen3moe_gguf_layout_and_reference(tmp_path) -> None:
    path = write_tiny_gguf(
        tmp_path / "moe.gguf", arch="qwen3moe", dim=256, n_heads=4, n_kv_heads=2, head_dim=128, n_experts=4,
        n_active_experts=2, moe_hidden_dim=256, wtype="q4k", types={"ffn_down_exps": "q6k", "attn_v": "q80"},
    )  # fmt: skip
    r = gguf.GGUFReader(str(path))
    meta = {k: r.fields[k].contents() for k in r.fields if k.startswith("qwen3moe.")}
    assert meta["qwen3moe.expert_count"] == 4 and meta["qwen3moe.expert_used_count"] == 2
    assert meta["qwen3moe.expert_feed_forward_length"] == 256 and meta["qwen3moe.attention.key_length"] == 128
    tensors = {t.name: (t.tensor_type.name, t.shape.tolist()) for t in r.tensors}
    assert tensors["blk.0.ffn_gate_exps.weight"] == ("Q4_K", [256, 256, 4])  # ne0 = dim first
    assert tensors["blk.1.ffn_down_exps.weight"] == ("Q6_K", [256, 256, 4])
    assert tensors["blk.0.ffn_gate_inp.weight"] == ("F32", [256, 4])
    assert tensors["blk.0.attn_q.weight"] == ("Q4_K", [256, 512])
    assert tensors["blk.0.attn_v.weight"] == ("Q8_0", [256, 256])
    assert tensors["blk.0.attn_k_norm.weight"] == ("F32", [128])
    assert "blk.0.ffn_gate.weight" not in tensors
    m = load_ref_model(path)
    assert (m.n_experts, m.n_active_experts, m.head_dim, m.rope_neox) == (4, 2, 128, True)
    exact = tiny_weights(
        dim=256, hidden_dim=96, n_layers=2, n_heads=4, n_kv_heads=2, vocab=288, seed=0, tied=False,
        arch="qwen3moe", head_dim=128, n_experts=4, moe_hidden_dim=256,
    )  # fmt: skip
    stack = m.weights["blk.0.ffn_up_exps.weight"]
    assert stack.shape == (4, 256, 256)
    assert (
        np.sqrt(np.mean((stack - exact["blk.0.ffn_up_exps.weight"]) ** 2)) < 0.08 / 16
    )  # Q4_K of 1/sqrt(256)


def test_tiny_gguf_type_overrides_are_checked(tmp_path) -> None:
    with pytest.raises(ValueError, match="ffn_down_exps"):
        write_tiny_gguf(tmp_path / "x.gguf", arch="qwen2", types={"ffn_down_exps": "q6k"})
    path = write_tiny_gguf(
        tmp_path / "q2.gguf", arch="qwen2", types={"attn_q.bias": "f16", "token_embd": "q50"}
    )
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    assert types["blk.1.attn_q.bias"] == "F16" and types["blk.1.attn_k.bias"] == "F32"
    assert types["token_embd.weight"] == "Q5_0" and types["output.weight"] == "F32"


def _read_m(path: Path) -> tuple[list[tuple[int, int]], bytes]:
    raw = path.read_bytes()
    magic, header_size = struct.unpack_from("<ii", raw)
    assert magic == 0x0A00ABCD and (header_size - 8) % 8 == 0
    pairs = [struct.unpack_from("<ii", raw, 8 + 8 * i) for i in range((header_size - 8) // 8)]
    return pairs, raw[header_size:]


@pytest.mark.parametrize(("arch", "wtype"), [("qwen3moe", "q40"), ("llama", "q80"), ("qwen3", "f16")])
def test_tiny_m_file_follows_the_converter_layout(tmp_path, arch: str, wtype: str) -> None:
    tm = write_tiny_m(tmp_path / "t.m", arch=arch, wtype=wtype, dim=64, hidden_dim=96, n_layers=2, vocab=288)
    pairs, body = _read_m(tm.path)
    # convert-hf.py's dict order: version, arch_type, hidden_act, dim, hidden_dim, n_layers, n_heads,
    # n_kv_heads, weights_float_type, max_seq_len, vocab_size, n_experts, n_active_experts, rope_theta,
    # [head_dim], norm_epsilon, [moe_hidden_dim]
    keys = [0, 1, 11, 2, 3, 4, 5, 6, 13, 10, 9, 7, 8, 12] + ([19] if arch != "llama" else []) + [20]
    keys += [21] if arch == "qwen3moe" else []
    assert [k for k, _ in pairs] == keys
    values = dict(pairs)
    assert values[1] == {"llama": 0xABCD00, "qwen3": 0xABCD01, "qwen3moe": 0xABCD02}[arch]
    assert values[13] == {"f32": 0, "f16": 1, "q40": 2, "q80": 3}[wtype] and values[20] == 5
    gt = {"f16": gguf.GGMLQuantizationType.F16, "q40": gguf.GGMLQuantizationType.Q4_0}
    gt["q80"] = gguf.GGMLQuantizationType.Q8_0

    def mat(name: str, rows: int, cols: int, expert: int | None = None) -> tuple:
        return name, expert, (rows, cols), wtype

    def vec(name: str, n: int) -> tuple:
        return name, None, (n,), "f32"

    order = [("token_embd.weight", None, (288, 64), "f32")]
    for layer in range(2):
        p = f"blk.{layer}."
        order += [mat(p + "attn_q.weight", 64, 64), mat(p + "attn_k.weight", 32, 64)]
        order += [mat(p + "attn_v.weight", 32, 64), mat(p + "attn_output.weight", 64, 64)]
        if arch == "qwen3moe":
            order.append((p + "ffn_gate_inp.weight", None, (4, 64), "f32"))
            for e in range(4):
                order += [mat(p + f"ffn_{t}_exps.weight", 64, 64, e) for t in ("gate", "down", "up")]
        else:
            order += [mat(p + "ffn_gate.weight", 96, 64), mat(p + "ffn_down.weight", 64, 96)]
            order.append(mat(p + "ffn_up.weight", 96, 64))
        if arch != "llama":
            order += [vec(p + "attn_q_norm.weight", 16), vec(p + "attn_k_norm.weight", 16)]
        order += [vec(p + "attn_norm.weight", 64), vec(p + "ffn_norm.weight", 64)]
    order += [vec("output_norm.weight", 64), mat("output.weight", 288, 64)]
    at = 0
    for name, expert, shape, dtype in order:
        n = int(np.prod(shape))
        size = {"f32": 4 * n, "f16": 2 * n, "q40": n // 32 * 18, "q80": n // 32 * 34}[dtype]
        chunk = np.frombuffer(body, np.uint8, size, at)
        values = chunk.view("<f4") if dtype == "f32" else gguf.quants.dequantize(chunk, gt[dtype])
        stored = tm.weights[name] if expert is None else tm.weights[name][expert]
        np.testing.assert_array_equal(values.reshape(shape), stored, err_msg=name)
        at += size
    assert at == len(body)  # header + tensors is the whole file


@pytest.mark.parametrize("arch", ["llama", "llama3.1", "qwen3", "qwen3moe"])
def test_tiny_m_reference_equals_the_gguf_of_the_same_weights(tmp_path, arch: str) -> None:
    shape = dict(dim=64, hidden_dim=96, n_heads=4, n_kv_heads=2, seed=5, tied=True, moe_hidden_dim=64)
    if arch == "llama3.1":  # integer factors survive the .m header's int32 values
        arch, shape["rope_scaling"] = "llama", RopeScaling(8.0, 1.0, 4.0, 16)
    tm = write_tiny_m(tmp_path / "t.m", arch=arch, **shape)
    from_gguf = load_ref_model(write_tiny_gguf(tmp_path / "t.gguf", arch=arch, **shape))
    from_m = tm.ref_model()
    assert (from_m.rope_neox, from_m.n_experts, from_m.rope_scaling) == (
        from_gguf.rope_neox, from_gguf.n_experts, from_gguf.rope_scaling,
    )  # fmt: skip
    if "rope_scaling" in shape:
        assert [k for k in tm.header][14:19] == [
            "rope_scaling_factor", "rope_scaling_low_freq_factor", "rope_scaling_high_freq_factory",
            "rope_scaling_orig_max_seq_len", "rope_type",
        ]  # fmt: skip
    tokens = TOKENS * 3  # past the original context of 16 where scaling is on
    np.testing.assert_allclose(ref_forward(from_m, tokens), ref_forward(from_gguf, tokens), rtol=0, atol=1e-5)
