"""Real models on the CPU backend against the golden HF-transformers outputs in ../shared: the embedded
SmolLM2-135M (Q4_1) and Qwen2.5-Coder-0.5B (qwen2, a Q5_0/Q8_0/Q4_K/Q6_K mix)."""

from __future__ import annotations

import pytest
from golden_checks import QWEN25, check_greedy_prefix, check_last_logits, check_perplexity

from cpu_fallback.backend import CpuBackend
from engine.model_file import open_model
from engine.runner import Runner
from engine.tokenizer import tokenizer_from_gguf


@pytest.fixture(scope="module", params=["f32", "q80"])
def runner(request, smollm2):
    return Runner(smollm2, CpuBackend(2), request.param, max_seq_len=512)


def test_last_logits(golden, runner):
    check_last_logits(golden, runner)


def test_perplexity(golden, runner, smollm2, shared):
    check_perplexity(
        golden, runner, tokenizer_from_gguf(smollm2.metadata), (shared / "ppl_text.txt").read_text()
    )


def test_greedy_prefix(golden, smollm2):
    runner = Runner(smollm2, CpuBackend(2), "f32", max_seq_len=512)
    check_greedy_prefix(golden, runner, tokenizer_from_gguf(smollm2.metadata))


# ---- Qwen2.5-Coder-0.5B ----


@pytest.fixture(scope="module")
def qwen25(qwen25_path):
    return open_model(qwen25_path)


@pytest.fixture(scope="module")
def qwen_f32(qwen25):
    return Runner(qwen25, CpuBackend(2), "f32", max_seq_len=256)


@pytest.fixture(scope="module", params=["f32", "q80"])
def qwen_runner(request, qwen25, qwen_f32):
    return qwen_f32 if request.param == "f32" else Runner(qwen25, CpuBackend(2), "q80", max_seq_len=256)


@pytest.mark.slow
def test_qwen25_last_logits(qwen25_golden, qwen_runner):
    check_last_logits(qwen25_golden, qwen_runner, QWEN25)


@pytest.mark.slow
def test_qwen25_perplexity(qwen25_golden, qwen_runner, qwen25_tokenizer):
    text = qwen25_golden[0]["perplexity"]["text"]
    check_perplexity(qwen25_golden, qwen_runner, qwen25_tokenizer, text, QWEN25)


@pytest.mark.slow
def test_qwen25_greedy_prefix(qwen25_golden, qwen_f32, qwen25_tokenizer):
    check_greedy_prefix(qwen25_golden, qwen_f32, qwen25_tokenizer)
