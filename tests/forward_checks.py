"""Forward passes of tiny random models against the float64 reference, shared by every backend's tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from reference import RefModel, load_ref_model, ref_forward
from tinymodel import write_tiny_gguf, write_tiny_m

from engine.backend import Backend
from engine.config import RopeScaling
from engine.model_file import open_model
from engine.runner import Runner
from engine.weights import Model

SHAPES = {  # dim, hidden, heads, kv heads: GQA, odd head counts, MQA, MHA
    "gqa4x2": dict(dim=64, hidden_dim=96, n_heads=4, n_kv_heads=2),
    "mqa3x1": dict(dim=96, hidden_dim=160, n_heads=3, n_kv_heads=1),
    "mha5x5": dict(dim=160, hidden_dim=224, n_heads=5, n_kv_heads=5),
}
TOKENS = [5, 17, 200, 3, 99, 42, 7, 150, 11]


def tiny_model(tmp_path: Path, wtype: str, shape: str, **kw) -> tuple[Model, RefModel]:
    """A random GGUF of one of SHAPES, opened by the engine and by the reference."""
    path = write_tiny_gguf(
        tmp_path / f"{shape}-{wtype}.gguf", wtype=wtype, seed=len(shape), **SHAPES[shape], **kw
    )
    return open_model(path), load_ref_model(path)


def assert_matches(got: np.ndarray, expected: np.ndarray) -> None:
    """f32 activations reproduce the float64 reference to 1e-4 of the largest logit."""
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 1e-4 * max(np.abs(expected).max(), 1.0)


def check_reference(tmp_path: Path, backend: Backend, wtype: str, shape: str) -> None:
    """Every row's logits, prefilled in batches of 4, 4 and 1."""
    model, ref = tiny_model(tmp_path, wtype, shape)
    runner = Runner(model, backend, "f32", max_seq_len=64, max_batch=4)
    assert_matches(runner.forward(TOKENS, 0, "all"), ref_forward(ref, TOKENS))


def check_q80_activations(tmp_path: Path, backend: Backend, wtype: str) -> None:
    """The engine reproduces the reference's Q80 numerics much more closely than the f32 model does."""
    model, ref = tiny_model(tmp_path, wtype, "gqa4x2")
    expected = ref_forward(ref, TOKENS, q80=True)
    plain = ref_forward(ref, TOKENS)
    got = Runner(model, backend, "q80", max_seq_len=64).forward(TOKENS, 0, "all")
    err = np.abs(got - expected).max()
    assert err <= 2e-3 * np.abs(expected).max()
    assert err < np.abs(plain - expected).max() / 4


def check_f16_kv_cache(tmp_path: Path, backend: Backend) -> None:
    """kv_type "f16": the reference with its keys and values rounded to halves, far closer than the f32
    reference; half the KV-cache bytes."""
    model, ref = tiny_model(tmp_path, "f32", "gqa4x2")
    expected = ref_forward(ref, TOKENS, kv_f16=True)
    plain = ref_forward(ref, TOKENS)
    r = Runner(model, backend, max_seq_len=64, max_batch=4, kv_type="f16")
    got = r.forward(TOKENS, 0, "all")
    err = np.abs(got - expected).max()
    assert err <= 1e-4 * np.abs(expected).max()
    assert err < np.abs(plain - expected).max() / 10
    f32 = Runner(model, backend, max_seq_len=64, max_batch=4)
    assert r.graph.kv_type == "f16" and r.program.kv_cache_bytes * 2 == f32.program.kv_cache_bytes


def check_prefill_equals_decode(tmp_path: Path, backend: Backend) -> None:
    """One batched prefill, token-by-token decoding and a last-row-only prefill give the same logits."""
    model, _ = tiny_model(tmp_path, "q41", "gqa4x2")
    batched = Runner(model, backend, max_seq_len=32).forward(TOKENS, 0, "all")
    stepper = Runner(model, backend, max_seq_len=32)
    single = np.stack([stepper.forward([t], i) for i, t in enumerate(TOKENS)])
    np.testing.assert_allclose(single, batched, atol=1e-5, rtol=1e-5)
    last = Runner(model, backend, max_seq_len=32).forward(TOKENS, 0)
    np.testing.assert_allclose(last, batched[-1], atol=1e-5, rtol=1e-5)


def check_llama31_rope_scaling(tmp_path: Path, backend: Backend, store: str) -> None:
    """Llama 3.1 frequency scaling (GGUF keys or a rope_freqs tensor), past the original context."""
    rs = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, orig_max_seq_len=32)
    model, ref = tiny_model(tmp_path, "f32", "gqa4x2", rope_scaling=rs, rope_store=store, rope_theta=500000.0)
    assert ref.rope_scaling is not None or "rope_freqs.weight" in ref.weights
    tokens = TOKENS * 3
    assert_matches(Runner(model, backend, max_seq_len=64).forward(tokens, 0, "all"), ref_forward(ref, tokens))


def check_tied_embeddings(tmp_path: Path, backend: Backend) -> Runner:
    """A model without output.weight classifies with its token embeddings; returns the runner."""
    model, ref = tiny_model(tmp_path, "q80", "gqa4x2", tied=True)
    assert model.tied and "output.weight" not in ref.weights  # the file has none; the model aliases the table
    runner = Runner(model, backend, max_seq_len=64)
    assert_matches(runner.forward(TOKENS, 0, "all"), ref_forward(ref, TOKENS))
    return runner


# ---- the other architectures: GGUF (K-quant mixes included) and distributed-llama .m files ----

ARCHS = {  # tiny shapes: qwen3 with a head_dim of its own; FFN widths of whole 256-value super-blocks
    "qwen2": dict(arch="qwen2", dim=64, hidden_dim=512, n_heads=4, n_kv_heads=2),
    "qwen3": dict(arch="qwen3", dim=64, hidden_dim=512, n_heads=4, n_kv_heads=2, head_dim=32),
    "qwen3moe": dict(
        arch="qwen3moe",
        dim=64,
        hidden_dim=96,
        n_heads=4,
        n_kv_heads=2,
        head_dim=32,
        n_experts=4,
        n_active_experts=2,
        moe_hidden_dim=256,
    ),
}
# a Q4_K_M-like mix: legacy types where rows are 64 values, K-quants on the 256-multiple FFN inputs
MIX = {"attn_v": "q80", "token_embd": "q50", "output": "q51"}


def _mix(arch: str) -> dict[str, str]:
    return {**MIX, **({"ffn_down_exps": "q4k"} if arch == "qwen3moe" else {"ffn_down": "q6k"})}


def arch_model(
    tmp_path: Path, arch: str, wtype: str, mix: bool, types: dict[str, str] | None = None
) -> tuple[Model, RefModel]:
    """A random GGUF of one architecture, opened by the engine and by the reference."""
    types = {**(_mix(arch) if mix else {}), **(types or {})}
    path = write_tiny_gguf(
        tmp_path / f"{arch}-{wtype}-{mix}.gguf", wtype=wtype, seed=11, types=types, **ARCHS[arch]
    )
    return open_model(path), load_ref_model(path)


def check_architecture(tmp_path: Path, backend: Backend, arch: str, wtype: str, mix: bool) -> None:
    """Every row's logits in f32 activations, prefilled in batches of 4, 4 and 1."""
    model, ref = arch_model(tmp_path, arch, wtype, mix)
    runner = Runner(model, backend, "f32", max_seq_len=64, max_batch=4)
    assert_matches(runner.forward(TOKENS, 0, "all"), ref_forward(ref, TOKENS))


def check_architecture_q80(tmp_path: Path, backend: Backend, arch: str) -> None:
    """Q80 activations: the reference's Q80 numerics, much closer than the f32 model's."""
    model, ref = arch_model(tmp_path, arch, "q50", True)
    expected, plain = ref_forward(ref, TOKENS, q80=True), ref_forward(ref, TOKENS)
    got = Runner(model, backend, "q80", max_seq_len=64).forward(TOKENS, 0, "all")
    err = np.abs(got - expected).max()
    assert err <= 2e-3 * np.abs(expected).max()
    assert err < np.abs(plain - expected).max() / 4


def check_m_file(tmp_path: Path, backend: Backend, arch: str, wtype: str) -> None:
    """A .m file as distributed-llama's converter writes it (written independently of the engine)."""
    shape = {k: v for k, v in ARCHS.get(arch, SHAPES["gqa4x2"]).items() if k != "arch"}
    tm = write_tiny_m(tmp_path / f"{arch}-{wtype}.m", arch=arch, wtype=wtype, seed=5, vocab=288, **shape)
    model = open_model(tm.path)
    assert model.kind == "m" and model.config.arch == arch
    runner = Runner(model, backend, "f32", max_seq_len=64, max_batch=4)
    assert_matches(runner.forward(TOKENS, 0, "all"), ref_forward(tm.ref_model(), TOKENS))


VECTOR_TYPES = {"attn_norm": "bf16", "ffn_norm": "f16", "output_norm": "bf16", "attn_q.bias": "bf16"}


def check_vector_types(tmp_path: Path, backend: Backend) -> None:
    """Norm scales and biases stored as bf16 or f16 are decoded as numbers, not read as bit patterns."""
    model, ref = arch_model(tmp_path, "qwen2", "f32", False, types=VECTOR_TYPES)
    assert model.weights["blk.0.attn_norm.weight"].dtype == "bf16"
    runner = Runner(model, backend, "f32", max_seq_len=64, max_batch=4)
    assert_matches(runner.forward(TOKENS, 0, "all"), ref_forward(ref, TOKENS))


SEQS = [TOKENS, [9, 8, 7, 6, 5, 4], [280, 1, 2, 250, 33, 44, 55]]  # three conversations, one KV slot each


def check_batched_slots(tmp_path: Path, backend: Backend, wtype: str) -> None:
    """Three sequences in three KV slots (--parallel 3), batched as forward_rows of mixed slots and positions,
    give each sequence's own float64 logits, and the last row (alone) the single-slot runner's."""
    model, ref = tiny_model(tmp_path, wtype, "gqa4x2")
    expected = [ref_forward(ref, s) for s in SEQS]  # float64, each sequence on its own
    runner = Runner(model, backend, max_seq_len=16, max_batch=4, n_slots=3)
    slots = [2, 0, 1]  # not in sequence order, so a row that reads the wrong slot fails
    for seq, slot in zip(SEQS, slots, strict=True):
        runner.forward(seq[:3], 0, "none", slot=slot)
    # one pass: two consecutive rows of sequence 0, then one row each of sequences 1 and 2
    rows = runner.forward_rows([SEQS[0][3], SEQS[0][4], SEQS[1][3], SEQS[2][3]], [3, 4, 3, 3], [2, 2, 0, 1])
    for got, (s, p) in zip(rows, [(0, 3), (0, 4), (1, 3), (2, 3)], strict=True):
        assert_matches(got[None], expected[s][p][None])
    # decode steps of all three together, each at its own position, to each sequence's end
    pos = [5, 4, 4]
    while any(p < len(s) for p, s in zip(pos, SEQS, strict=True)):
        live = [i for i in range(3) if pos[i] < len(SEQS[i])]
        rows = runner.forward_rows(
            [SEQS[i][pos[i]] for i in live], [pos[i] for i in live], [slots[i] for i in live]
        )
        for got, i in zip(rows, live, strict=True):
            assert_matches(got[None], expected[i][pos[i]][None])
            pos[i] += 1
    assert live == [0]  # the longest sequence ended alone: its last row against the single-slot path
    alone = Runner(model, backend, max_seq_len=16, max_batch=4).forward(SEQS[0], 0, "all")
    np.testing.assert_allclose(rows[-1], alone[-1], atol=1e-5, rtol=1e-5)
