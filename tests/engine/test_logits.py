"""Logits processing (penalties, logit bias) against a plain per-id loop, and raw log-probabilities."""

from __future__ import annotations

import math

import numpy as np
import pytest

from engine.errors import DllamaError
from engine.logits import LogitsProcessor, log_softmax_at
from engine.sampler import Sampler


def loop_reference(logits, prompt, generated, presence, frequency, repetition, bias) -> np.ndarray:
    """The rules written out id by id in float64: bias, repetition over prompt + generated, then
    frequency/presence over the generated tokens."""
    out = [float(v) for v in logits]
    for i in range(len(out)):
        out[i] += bias.get(i, 0.0)
        if i in prompt or i in generated:
            out[i] = out[i] / repetition if out[i] > 0 else out[i] * repetition
        count = generated.count(i)
        out[i] -= count * frequency + (presence if count > 0 else 0.0)
    return np.array(out)


@pytest.mark.parametrize(
    ("presence", "frequency", "repetition", "bias"),
    [(0.7, 0.0, 1.0, {}), (0.0, -1.3, 1.0, {}), (0.0, 0.0, 1.8, {}), (-2.0, 2.0, 0.6, {3: 50.0, 7: -100.0})],
)
def test_processor_matches_the_loop(presence, frequency, repetition, bias):
    rng = np.random.default_rng(5)
    vocab = 40
    logits = rng.normal(scale=3, size=vocab + 4).astype(np.float32)  # 4 padding ids beyond the vocabulary
    prompt = [int(t) for t in rng.integers(0, vocab, 12)]
    generated = [int(t) for t in rng.integers(0, vocab, 30)]
    proc = LogitsProcessor(vocab, presence, frequency, repetition, bias, prompt)
    for token in generated:
        proc.accept(token)
    want = loop_reference(logits[:vocab], prompt, generated, presence, frequency, repetition, bias)
    got = proc(logits)
    assert got.shape == (vocab,)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    assert not np.array_equal(got, logits[:vocab])


def test_processor_leaves_the_input_alone():
    logits = np.arange(5, dtype=np.float32)
    proc = LogitsProcessor(5, presence=1.0, bias={0: 3.0})
    proc.accept(4)
    proc(logits)
    np.testing.assert_array_equal(logits, np.arange(5, dtype=np.float32))


def test_frequency_counts_only_generated_tokens_and_repetition_the_prompt_too():
    logits = np.full(4, 2.0, np.float32)
    proc = LogitsProcessor(4, frequency=0.5, prompt=[1])
    proc.accept(2)
    proc.accept(2)
    np.testing.assert_array_equal(proc(logits), [2.0, 2.0, 1.0, 2.0])
    proc = LogitsProcessor(4, repetition=2.0, prompt=[1])
    proc.accept(2)
    np.testing.assert_array_equal(proc(np.array([2, 2, -2, 2], np.float32)), [2.0, 1.0, -4.0, 2.0])


def test_sampler_with_bias_takes_the_runner_up():
    logits = np.array([0.1, 3.0, 2.5, -1.0], np.float32)
    assert Sampler(4, temperature=0).sample(logits) == 1
    assert Sampler(4, 0, processor=LogitsProcessor(4, bias={1: -100.0})).sample(logits) == 2
    assert Sampler(4, 0, processor=LogitsProcessor(4, bias={3: 100.0})).sample(logits) == 3


def test_sampler_feeds_its_draws_to_the_penalties():
    """A presence penalty larger than every gap forbids repeating a token: greedy walks down the ranking."""
    logits = np.array([4.0, 3.0, 2.0, 1.0], np.float32)
    s = Sampler(4, temperature=0, processor=LogitsProcessor(4, presence=2.0))
    assert [s.sample(logits) for _ in range(3)] == [0, 1, 0]  # after 0 and 1: 2.0, 1.0, 2.0, 1.0 -> 0


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"presence": 2.5}, "presence penalty"),
        ({"frequency": -3.0}, "frequency penalty"),
        ({"repetition": 0.0}, "repetition penalty"),
        ({"bias": {9: 1.0}}, "not in the vocabulary"),
        ({"bias": {1: 101.0}}, "-100..100"),
    ],
)
def test_processor_refuses_out_of_range_settings(kwargs, fragment):
    with pytest.raises(DllamaError, match=fragment):
        LogitsProcessor(4, **kwargs)


def test_inactive_processor_is_skipped():
    assert Sampler(4, 0, processor=LogitsProcessor(4)).processor is None


def test_log_softmax_at_equals_the_float64_definition():
    rng = np.random.default_rng(1)
    logits = rng.normal(scale=4, size=1003).astype(np.float32)
    vocab = 1000
    x = logits[:vocab].astype(np.float64)
    lse = math.log(sum(math.exp(v) for v in x))
    lp, top = log_softmax_at(logits, vocab, 17, 5)
    assert lp == pytest.approx(x[17] - lse, abs=1e-12)
    ranked = sorted(range(vocab), key=lambda i: -x[i])[:5]
    assert [i for i, _ in top] == ranked
    for i, v in top:
        assert v == pytest.approx(x[i] - lse, abs=1e-12)
    assert log_softmax_at(logits, vocab, 17, 0)[1] == []
