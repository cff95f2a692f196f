"""The embedded SmolLM2-135M on the CPU backend against the golden HF-transformers outputs in ../shared."""

from __future__ import annotations

import pytest
from golden_checks import check_last_logits, check_perplexity

from cpu_fallback.backend import CpuBackend
from engine.generate import generate
from engine.runner import Runner
from engine.sampler import Sampler
from engine.tokenizer import tokenizer_from_gguf


@pytest.fixture(scope="module", params=["f32", "q80"])
def runner(request, smollm2):
    return Runner(smollm2, CpuBackend(2), request.param, max_seq_len=512)


def test_last_logits(golden, runner):
    check_last_logits(golden, runner)


def test_perplexity(golden, runner, smollm2, shared):
    check_perplexity(golden, runner, smollm2, shared)


def test_greedy_prefix(golden, smollm2):
    """Greedy ids are pinned for f32 activations only (safe_prefix_f32: reference margins >= 0.5)."""
    runner = Runner(smollm2, CpuBackend(2), "f32", max_seq_len=512)
    meta, npz = golden
    tok = tokenizer_from_gguf(smollm2.metadata)
    for case in meta["cases"]:
        i, n = case["case"], case["safe_prefix_f32"]
        if n == 0:
            continue
        events = generate(runner, tok, list(npz[f"case{i}_prompt_ids"]), n, Sampler(tok.vocab_size, 0.0))
        got = [e.token for e in events if e.kind == "token"]
        assert got == list(npz[f"case{i}_greedy_ids"][:n])

