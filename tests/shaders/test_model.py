"""Whole forward passes on the Vulkan backend against the independent float64 reference (tiny models)."""

from __future__ import annotations

import numpy as np
import pytest
from reference import load_ref_model, ref_forward
from tinymodel import write_tiny_gguf

from engine.config import RopeScaling
from engine.errors import DllamaError
from engine.model_file import open_model
from engine.runner import Runner

SHAPES = {  # dim, hidden, heads, kv heads: GQA, odd head counts, MQA, MHA
    "gqa4x2": dict(dim=64, hidden_dim=96, n_heads=4, n_kv_heads=2),
    "mqa3x1": dict(dim=96, hidden_dim=160, n_heads=3, n_kv_heads=1),
    "mha5x5": dict(dim=160, hidden_dim=224, n_heads=5, n_kv_heads=5),
}
TOKENS = [5, 17, 200, 3, 99, 42, 7, 150, 11]
CASES = [
    ("f32", "gqa4x2"),
    ("f16", "gqa4x2"),
    ("bf16", "gqa4x2"),
    ("q80", "gqa4x2"),
    ("q40", "gqa4x2"),
    ("q41", "gqa4x2"),
    ("q41", "mqa3x1"),
    ("q40", "mha5x5"),
]


def _model(tmp_path, wtype: str, shape: str, **kw):
    path = write_tiny_gguf(
        tmp_path / f"{shape}-{wtype}.gguf", wtype=wtype, seed=len(shape), **SHAPES[shape], **kw
    )
    return open_model(path), load_ref_model(path)


def _assert_matches(got: np.ndarray, expected: np.ndarray) -> None:
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 1e-4 * max(np.abs(expected).max(), 1.0)


@pytest.mark.parametrize("wtype,shape", CASES)
def test_logits_match_float64_reference(tmp_path, vk, wtype, shape):
    model, ref = _model(tmp_path, wtype, shape)
    runner = Runner(model, vk, "f32", max_seq_len=64, max_batch=4)  # 9 tokens: batches of 4, 4, 1
    _assert_matches(runner.forward(TOKENS, 0, "all"), ref_forward(ref, TOKENS))


@pytest.mark.parametrize("backend", ["vk_gpu", "vk_plain"])
def test_gpu_work_split_matches_reference(request, tmp_path, backend):
    """The GPU tuning (workgroup reductions; subgroup or shared-memory) over a whole model, on any device."""
    model, ref = _model(tmp_path, "q40", "mqa3x1")
    runner = Runner(model, request.getfixturevalue(backend), "f32", max_seq_len=64, max_batch=4)
    _assert_matches(runner.forward(TOKENS, 0, "all"), ref_forward(ref, TOKENS))


@pytest.mark.parametrize("wtype", ["f32", "q40", "q41"])
def test_q80_activations_match_simulated_reference(tmp_path, vk, wtype):
    model, ref = _model(tmp_path, wtype, "gqa4x2")
    expected = ref_forward(ref, TOKENS, q80=True)
    plain = ref_forward(ref, TOKENS)
    got = Runner(model, vk, "q80", max_seq_len=64).forward(TOKENS, 0, "all")
    err = np.abs(got - expected).max()
    assert err <= 2e-3 * np.abs(expected).max()
    assert err < np.abs(plain - expected).max() / 4


def test_prefill_equals_token_by_token_decode(tmp_path, vk):
    model, _ = _model(tmp_path, "q41", "gqa4x2")
    batched = Runner(model, vk, max_seq_len=32).forward(TOKENS, 0, "all")
    stepper = Runner(model, vk, max_seq_len=32)
    single = np.stack([stepper.forward([t], i) for i, t in enumerate(TOKENS)])
    np.testing.assert_allclose(single, batched, atol=1e-5, rtol=1e-5)
    last = Runner(model, vk, max_seq_len=32).forward(TOKENS, 0)
    np.testing.assert_allclose(last, batched[-1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("store", ["keys", "tensor"])
def test_llama31_rope_scaling(tmp_path, vk, store):
    rs = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, orig_max_seq_len=32)
    model, ref = _model(tmp_path, "f32", "gqa4x2", rope_scaling=rs, rope_store=store, rope_theta=500000.0)
    tokens = TOKENS * 3
    _assert_matches(Runner(model, vk, max_seq_len=64).forward(tokens, 0, "all"), ref_forward(ref, tokens))


def test_tied_embeddings_are_uploaded_once(tmp_path, vk):
    model, ref = _model(tmp_path, "q80", "gqa4x2", tied=True)
    assert "output.weight" not in model.weights
    runner = Runner(model, vk, max_seq_len=64)
    prog = runner.program
    assert prog.slots["output.weight"] == prog.slots["token_embd.weight"]
    _assert_matches(runner.forward(TOKENS, 0, "all"), ref_forward(ref, TOKENS))


def test_layers_split_over_several_buffers(tmp_path, vk, monkeypatch):
    """With a small per-buffer limit each role's layers land in separate buffers; results do not change."""
    model, ref = _model(tmp_path, "q41", "gqa4x2", n_layers=3)
    monkeypatch.setattr(vk, "buffer_limit", 1024)
    runner = Runner(model, vk, max_seq_len=8, max_batch=4)
    assert len(runner.program.k_cache.tensors) == 3 and len(runner.program.chunks) > 12
    _assert_matches(runner.forward(TOKENS[:8], 0, "all"), ref_forward(ref, TOKENS[:8]))


def test_out_of_vocabulary_token_is_a_clear_error(tmp_path, vk):
    model, _ = _model(tmp_path, "f32", "gqa4x2")
    runner = Runner(model, vk, max_seq_len=16)
    with pytest.raises(DllamaError, match="token id 300 is outside the vocabulary"):
        runner.forward([1, 300], 0)


def test_worker_slice_matches_cpu_backend(tmp_path, vk):
    """Node 1 of 2 (a worker: no embedding, sliced heads/FFN/vocab, its slot of zq): segment by segment, fed
    the same pipes, it writes the same partial sums and logits as the CPU backend."""
    from cpu_fallback.backend import CpuBackend
    from engine.graph import build_graph
    from engine.slicing import node_slice, slice_weights

    model, _ = _model(tmp_path, "q40", "gqa4x2")
    sl = node_slice(model.config, 1, 2)
    graph = build_graph(model.config, sl, "q80", 16)
    weights = slice_weights(model, sl)
    progs = [be.compile(graph, weights, 4) for be in (CpuBackend(2), vk)]
    rng = np.random.default_rng(7)
    n = 3
    for p in progs:
        p.pipe("pos")[:n, 0] = np.arange(n)
    x = rng.standard_normal((n, model.config.dim)).astype(np.float32)
    zq = progs[0].pipe("zq")[:n].copy()
    for index, seg in enumerate(graph.segments):
        if not seg.ops:
            continue
        for p in progs:
            p.pipe("x")[:n] = x
            p.pipe("zq")[:n] = zq
            p.run_segment(index, n)
        out = "logits" if index == len(graph.segments) - 1 else "zq"
        cpu, gpu = (p.pipe(out)[:n].copy() for p in progs)
        if out == "zq":  # Q80 bytes: node 1's slot must agree (up to rare rounding-boundary flips)
            rb = cpu.shape[1] // 2
            assert np.mean(cpu[:, rb:] == gpu[:, rb:]) > 0.99
        else:
            _assert_matches(gpu, cpu)
        x, zq = progs[0].pipe("x")[:n].copy(), progs[0].pipe("zq")[:n].copy()
