"""Whole forward passes on the Vulkan backend against the independent float64 reference (tiny models)."""

from __future__ import annotations

import numpy as np
import pytest
from forward_checks import (
    ARCHS,
    TOKENS,
    assert_matches,
    check_architecture,
    check_architecture_q80,
    check_batched_slots,
    check_f16_kv_cache,
    check_llama31_rope_scaling,
    check_m_file,
    check_prefill_equals_decode,
    check_q80_activations,
    check_reference,
    check_tied_embeddings,
    check_vector_types,
    tiny_model,
)
from reference import ref_forward

from engine.errors import DllamaError
from engine.runner import Runner

CASES = [
    ("f32", "gqa4x2"),
    ("f16", "gqa4x2"),
    ("bf16", "gqa4x2"),
    ("q80", "gqa4x2"),
    ("q40", "gqa4x2"),
    ("q41", "gqa4x2"),
    ("q41", "mqa3x1"),
    ("q40", "mha5x5"),
    ("q50", "gqa4x2"),
    ("q51", "gqa4x2"),
]


@pytest.mark.parametrize("wtype,shape", CASES)
def test_logits_match_float64_reference(tmp_path, vk, wtype, shape):
    check_reference(tmp_path, vk, wtype, shape)


@pytest.mark.parametrize("backend", ["vk_gpu", "vk_plain"])
def test_gpu_work_split_matches_reference(request, tmp_path, backend):
    """The GPU tuning (workgroup reductions; subgroup or shared-memory) over a whole model, on any device."""
    model, ref = tiny_model(tmp_path, "q40", "mqa3x1")
    runner = Runner(model, request.getfixturevalue(backend), "f32", max_seq_len=64, max_batch=4)
    assert_matches(runner.forward(TOKENS, 0, "all"), ref_forward(ref, TOKENS))


@pytest.mark.parametrize("wtype", ["f32", "q40", "q41"])
def test_q80_activations_match_simulated_reference(tmp_path, vk, wtype):
    check_q80_activations(tmp_path, vk, wtype)


def test_prefill_equals_token_by_token_decode(tmp_path, vk):
    check_prefill_equals_decode(tmp_path, vk)


@pytest.mark.parametrize("store", ["keys", "tensor"])
def test_llama31_rope_scaling(tmp_path, vk, store):
    check_llama31_rope_scaling(tmp_path, vk, store)


def test_tied_embeddings_are_uploaded_once(tmp_path, vk):
    prog = check_tied_embeddings(tmp_path, vk).program
    assert prog.slots["output.weight"] == prog.slots["token_embd.weight"]


def test_one_node_runs_a_decode_token_as_one_submission(tmp_path, vk):
    """Without a network nothing happens between segments: a decode token is one recorded sequence (one
    submit and fence wait, the classifier included); a prefill needing only the last row's logits runs the
    classifier apart, on that row, after one device-side copy of the row."""
    model, ref = tiny_model(tmp_path, "q40", "gqa4x2")
    runner = Runner(model, vk, max_seq_len=16, max_batch=4)
    last = len(runner.graph.segments) - 1
    prog = runner.program
    prog.sequences.clear()
    submits = prog.submits
    got = np.stack([runner.forward([t], i) for i, t in enumerate(TOKENS[:3])])
    assert sorted(prog.sequences) == [(0, last + 1, 1)]
    assert prog.submits - submits == 3
    assert_matches(got, ref_forward(ref, TOKENS[:3]))
    prog.sequences.clear()
    submits = prog.submits
    logits = runner.forward(TOKENS[:3], 0, "last")
    assert sorted(prog.sequences) == [(0, last, 3), (last, last + 1, 1)]
    assert prog.submits - submits == 3  # the layers, the row copy, the classifier
    assert_matches(logits, ref_forward(ref, TOKENS[:3])[-1])


def test_layers_split_over_several_buffers(tmp_path, vk, monkeypatch):
    """With a small per-buffer limit each role's layers land in separate buffers; results do not change."""
    model, ref = tiny_model(tmp_path, "q41", "gqa4x2", n_layers=3)
    monkeypatch.setattr(vk, "buffer_limit", 1024)
    runner = Runner(model, vk, max_seq_len=8, max_batch=4)
    assert len(runner.program.k_cache.tensors) == 3 and len(runner.program.chunks) > 12
    assert_matches(runner.forward(TOKENS[:8], 0, "all"), ref_forward(ref, TOKENS[:8]))


def test_out_of_vocabulary_token_is_a_clear_error(tmp_path, vk):
    model, _ = tiny_model(tmp_path, "f32", "gqa4x2")
    runner = Runner(model, vk, max_seq_len=16)
    with pytest.raises(DllamaError, match="token id 300 is outside the vocabulary"):
        runner.forward([1, 300], 0)


def test_worker_slice_matches_cpu_backend(tmp_path, vk):
    """Node 1 of 2 (a worker: no embedding, sliced heads/FFN/vocab, its slot of zq): segment by segment, fed
    the same pipes, it writes the same partial sums and logits as the CPU backend."""
    from cpu_fallback.backend import CpuBackend
    from engine.graph import build_graph
    from engine.slicing import node_slice, slice_weights

    model, _ = tiny_model(tmp_path, "q40", "gqa4x2")
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
            assert_matches(gpu, cpu)
        x, zq = progs[0].pipe("x")[:n].copy(), progs[0].pipe("zq")[:n].copy()


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_architectures_match_float64_reference(tmp_path, vk, arch):
    check_architecture(tmp_path, vk, arch, "q50", True)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3moe"])
def test_architectures_with_q80_activations(tmp_path, vk, arch):
    check_architecture_q80(tmp_path, vk, arch)


@pytest.mark.parametrize(("arch", "wtype"), [("qwen3", "q40"), ("qwen3moe", "q80")])
def test_m_files_of_qwen3_and_qwen3moe(tmp_path, vk, arch, wtype):
    check_m_file(tmp_path, vk, arch, wtype)


def test_bf16_and_f16_vectors_are_decoded(tmp_path, vk):
    check_vector_types(tmp_path, vk)


def test_f16_kv_cache_matches_the_reference_with_half_keys_and_values(tmp_path, vk):
    check_f16_kv_cache(tmp_path, vk)


@pytest.mark.parametrize("backend", ["vk", "vk_gpu"])
def test_batched_rows_of_mixed_slots_and_positions_match_each_sequence_alone(request, tmp_path, backend):
    """--parallel on Vulkan: kv_store and attention use each row's KV slot (device and GPU work splits)."""
    check_batched_slots(tmp_path, request.getfixturevalue(backend), "q40")
