"""The engine's forward pass against the independent float64 reference on tiny random models."""

from __future__ import annotations

import numpy as np
import pytest
from reference import load_ref_model, ref_forward
from tinymodel import write_tiny_gguf

from cpu_fallback.backend import CpuBackend
from engine.config import RopeScaling
from engine.model_file import open_model
from engine.runner import Runner

SHAPES = {  # dim, hidden, heads, kv heads: GQA, odd head counts, MQA, MHA
    "gqa4x2": dict(dim=64, hidden_dim=96, n_heads=4, n_kv_heads=2),
    "mqa3x1": dict(dim=96, hidden_dim=160, n_heads=3, n_kv_heads=1),
    "mha5x5": dict(dim=160, hidden_dim=224, n_heads=5, n_kv_heads=5),
}
WTYPES = ["f32", "f16", "bf16", "q80", "q40", "q41"]
TOKENS = [5, 17, 200, 3, 99, 42, 7, 150, 11]


@pytest.fixture(scope="module")
def backend() -> CpuBackend:
    return CpuBackend(2)


def _model(tmp_path, wtype: str, shape: str, **kw):
    path = write_tiny_gguf(
        tmp_path / f"{shape}-{wtype}.gguf", wtype=wtype, seed=len(shape), **SHAPES[shape], **kw
    )
    return open_model(path), load_ref_model(path)


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("wtype", WTYPES)
def test_logits_match_float64_reference(tmp_path, backend, wtype, shape):
    model, ref = _model(tmp_path, wtype, shape)
    expected = ref_forward(ref, TOKENS)
    runner = Runner(model, backend, "f32", max_seq_len=64, max_batch=4)  # 9 tokens: batches of 4, 4, 1
    got = runner.forward(TOKENS, 0, "all")
    assert got.shape == expected.shape
    scale = np.abs(expected).max()
    assert np.abs(got - expected).max() <= 1e-4 * max(scale, 1.0)


@pytest.mark.parametrize("wtype", ["f32", "q40", "q41"])
def test_q80_activations_match_simulated_reference(tmp_path, backend, wtype):
    model, ref = _model(tmp_path, wtype, "gqa4x2")
    expected = ref_forward(ref, TOKENS, q80=True)
    plain = ref_forward(ref, TOKENS)
    got = Runner(model, backend, "q80", max_seq_len=64).forward(TOKENS, 0, "all")
    err = np.abs(got - expected).max()
    # the engine reproduces the Q80 numerics much more closely than the f32 model does
    assert err <= 2e-3 * np.abs(expected).max()
    assert err < np.abs(plain - expected).max() / 4


def test_prefill_equals_token_by_token_decode(tmp_path, backend):
    model, _ = _model(tmp_path, "q41", "gqa4x2")
    batched = Runner(model, backend, max_seq_len=32).forward(TOKENS, 0, "all")
    stepper = Runner(model, backend, max_seq_len=32)
    single = np.stack([stepper.forward([t], i) for i, t in enumerate(TOKENS)])
    np.testing.assert_allclose(single, batched, atol=1e-5, rtol=1e-5)
    last = Runner(model, backend, max_seq_len=32).forward(TOKENS, 0)
    np.testing.assert_allclose(last, batched[-1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("store", ["keys", "tensor"])
def test_llama31_rope_scaling(tmp_path, backend, store):
    rs = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, orig_max_seq_len=32)
    model, ref = _model(tmp_path, "f32", "gqa4x2", rope_scaling=rs, rope_store=store, rope_theta=500000.0)
    assert ref.rope_scaling is not None or "rope_freqs.weight" in ref.weights
    tokens = TOKENS * 3
    expected = ref_forward(ref, tokens)
    got = Runner(model, backend, max_seq_len=64).forward(tokens, 0, "all")
    assert np.abs(got - expected).max() <= 1e-4 * max(np.abs(expected).max(), 1.0)


def test_tied_embeddings(tmp_path, backend):
    model, ref = _model(tmp_path, "q80", "gqa4x2", tied=True)
    assert "output.weight" not in model.weights
    expected = ref_forward(ref, TOKENS)
    got = Runner(model, backend, max_seq_len=64).forward(TOKENS, 0, "all")
    assert np.abs(got - expected).max() <= 1e-4 * max(np.abs(expected).max(), 1.0)


def test_context_overflow_is_a_clear_error(tmp_path, backend):
    from engine.errors import DllamaError

    model, _ = _model(tmp_path, "f32", "gqa4x2")
    runner = Runner(model, backend, max_seq_len=8)
    with pytest.raises(DllamaError, match="context is full"):
        runner.forward(TOKENS, 0)


@pytest.mark.parametrize("src, dst", [("f32", "f32"), ("q40", "q40"), ("q80", "q80")])
def test_m_file_round_trip_gives_the_same_logits(tmp_path, backend, src, dst):
    """GGUF -> .m (+ .t, with special tokens moved to the end) -> load: identical logits, token by token."""
    from engine.convert import convert_gguf
    from engine.tokenizer import load_tokenizer, tokenizer_from_gguf

    gguf_path = write_tiny_gguf(tmp_path / "src.gguf", wtype=src, **SHAPES["gqa4x2"])
    convert_gguf(gguf_path, tmp_path / "out.m", dst, tmp_path / "out.t", log=lambda *_: None)
    g, m = open_model(gguf_path), open_model(tmp_path / "out.m")
    tg, tm = tokenizer_from_gguf(g.metadata), load_tokenizer(tmp_path / "out.t")
    text = "<|im_start|>user\nhi there<|im_end|>"
    ids_g, ids_m = tg.encode(text), tm.encode(text)
    assert tg.decode(ids_g) == tm.decode(ids_m) == text
    a = Runner(g, backend, max_seq_len=64).forward(ids_g, 0, "all")
    b = Runner(m, backend, max_seq_len=64).forward(ids_m, 0, "all")
    # the .m vocabulary is permuted: compare each logit under its token's bytes
    new_id = {tm.token_bytes(j): j for j in range(tm.vocab_size)}
    assert len(new_id) == tg.vocab_size
    np.testing.assert_array_equal(a, b[:, [new_id[tg.token_bytes(i)] for i in range(tg.vocab_size)]])
