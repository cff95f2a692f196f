"""The engine's forward pass on the CPU backend against the independent float64 reference (tiny models)."""

from __future__ import annotations

import numpy as np
import pytest
from forward_checks import (
    ARCHS,
    SHAPES,
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
from tinymodel import write_tiny_gguf

from cpu_fallback.backend import CpuBackend
from engine.model_file import open_model
from engine.runner import Runner

WTYPES = ["f32", "f16", "bf16", "q80", "q40", "q41", "q50", "q51"]


@pytest.fixture(scope="module")
def backend() -> CpuBackend:
    return CpuBackend(2)


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("wtype", WTYPES)
def test_logits_match_float64_reference(tmp_path, backend, wtype, shape):
    check_reference(tmp_path, backend, wtype, shape)


@pytest.mark.parametrize("wtype", ["f32", "q40", "q41"])
def test_q80_activations_match_simulated_reference(tmp_path, backend, wtype):
    check_q80_activations(tmp_path, backend, wtype)


def test_prefill_equals_token_by_token_decode(tmp_path, backend):
    check_prefill_equals_decode(tmp_path, backend)


@pytest.mark.parametrize("store", ["keys", "tensor"])
def test_llama31_rope_scaling(tmp_path, backend, store):
    check_llama31_rope_scaling(tmp_path, backend, store)


def test_tied_embeddings(tmp_path, backend):
    check_tied_embeddings(tmp_path, backend)


def test_context_overflow_is_a_clear_error(tmp_path, backend):
    from engine.errors import DllamaError

    model, _ = tiny_model(tmp_path, "f32", "gqa4x2")
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


def test_loading_runs_the_graph_once_so_the_first_timed_pass_is_not_a_warm_up(tmp_path, backend):
    """Kernel compilation and first-touch page faults belong to loading: before any forward pass the graph has
    run on 1 and 2 rows, and the warm-up leaves no trace in the logits of the first real tokens."""
    runs = []

    class Recording(CpuBackend):
        def compile(self, graph, weights, max_batch):
            program = super().compile(graph, weights, max_batch)
            run = program.run_segment
            program.run_segment = lambda index, n: (runs.append(n), run(index, n))[1]
            return program

    model, ref = tiny_model(tmp_path, "q40", "gqa4x2")
    runner = Runner(model, Recording(2), max_seq_len=16)
    assert sorted(set(runs)) == [1, 2]
    assert_matches(runner.forward(TOKENS[:3], 0, "all"), ref_forward(ref, TOKENS[:3]))


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize(("wtype", "mix"), [("f32", False), ("q50", True)])
def test_architectures_match_float64_reference(tmp_path, backend, arch, wtype, mix):
    check_architecture(tmp_path, backend, arch, wtype, mix)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_architectures_with_q80_activations(tmp_path, backend, arch):
    check_architecture_q80(tmp_path, backend, arch)


@pytest.mark.parametrize(
    ("arch", "wtype"), [("llama", "q40"), ("qwen3", "f32"), ("qwen3", "q40"), ("qwen3moe", "q80")]
)
def test_m_files_of_every_architecture(tmp_path, backend, arch, wtype):
    check_m_file(tmp_path, backend, arch, wtype)


def test_bf16_and_f16_vectors_are_decoded(tmp_path, backend):
    check_vector_types(tmp_path, backend)


def test_f16_kv_cache_matches_the_reference_with_half_keys_and_values(tmp_path, backend):
    check_f16_kv_cache(tmp_path, backend)


@pytest.mark.parametrize("wtype", ["f32", "q40"])
def test_batched_rows_of_mixed_slots_and_positions_match_each_sequence_alone(tmp_path, backend, wtype):
    check_batched_slots(tmp_path, backend, wtype)


def test_slot_and_parallel_limits_are_clear_errors(tmp_path, backend, monkeypatch):
    from engine.errors import DllamaError

    model, _ = tiny_model(tmp_path, "f32", "gqa4x2")
    runner = Runner(model, backend, max_seq_len=8, max_batch=4, n_slots=2)
    with pytest.raises(DllamaError, match="KV slot"):
        runner.forward([1, 2], 0, slot=2)
    with pytest.raises(DllamaError, match="--parallel must be 1..4"):
        Runner(model, backend, max_seq_len=8, max_batch=4, n_slots=5)
    monkeypatch.setattr("net.protocol.available_memory", lambda: 1000)
    with pytest.raises(DllamaError, match="lower --parallel or --max-seq-len"):
        Runner(model, backend, max_seq_len=8, max_batch=4, n_slots=2)
    assert Runner(model, backend, max_seq_len=8, max_batch=4).n_slots == 1  # one slot: no such check
