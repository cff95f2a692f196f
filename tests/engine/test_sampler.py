"""Sampling: greedy, temperature, nucleus cut-off, seeding, non-finite logits."""

from __future__ import annotations

import numpy as np
import pytest

from engine.errors import DllamaError
from engine.sampler import Sampler


def test_greedy_takes_first_maximum():
    logits = np.array([0.1, 3.0, 3.0, -1.0], np.float32)
    assert Sampler(4, temperature=0).sample(logits) == 1


def test_only_tokenizer_vocabulary_is_sampled():
    logits = np.array([0.0, 1.0, 50.0], np.float32)  # id 2 lies beyond a 2-token tokenizer
    assert Sampler(2, temperature=0).sample(logits) == 1
    assert all(Sampler(2, 1.0, 1.0, seed=s).sample(logits) in (0, 1) for s in range(20))


def test_topp_keeps_the_smallest_prefix_reaching_the_mass():
    probs = np.array([0.5, 0.3, 0.15, 0.05])  # top-p 0.7 keeps {0, 1}; 0.85 keeps {0, 1, 2}
    logits = np.log(probs).astype(np.float32)
    seen = {Sampler(4, 1.0, 0.7, seed=s).sample(logits) for s in range(300)}
    assert seen == {0, 1}
    seen = {Sampler(4, 1.0, 0.85, seed=s).sample(logits) for s in range(300)}
    assert seen == {0, 1, 2}


def test_temperature_sampling_follows_the_distribution():
    probs = np.array([0.6, 0.3, 0.1])
    s = Sampler(3, temperature=1.0, topp=1.0, seed=1)
    draws = np.bincount([s.sample(np.log(probs).astype(np.float32)) for _ in range(4000)], minlength=3)
    np.testing.assert_allclose(draws / 4000, probs, atol=0.03)


def test_same_seed_same_draws():
    logits = np.random.default_rng(0).normal(size=100).astype(np.float32)
    a = [Sampler(100, 0.8, 0.9, seed=7).sample(logits) for _ in range(5)]
    s1, s2 = Sampler(100, 0.8, 0.9, seed=7), Sampler(100, 0.8, 0.9, seed=7)
    assert [s1.sample(logits) for _ in range(10)] == [s2.sample(logits) for _ in range(10)]
    assert len(set(a)) == 1


def test_non_finite_logits_are_refused_in_one_line():
    for bad in (np.nan, np.inf):
        logits = np.array([0.0, bad, 1.0], np.float32)
        for temperature in (0.0, 0.8):
            with pytest.raises(DllamaError, match="not a finite number"):
                Sampler(3, temperature, 0.9, seed=0).sample(logits)


def test_tiny_temperature_is_greedy_without_overflow():
    logits = np.array([1.0, 3.0, 2.9, -50.0], np.float32)  # (2.9 - 3) / 1e-300 underflows exp to 0
    assert {Sampler(4, 1e-300, 1.0, seed=s).sample(logits) for s in range(20)} == {1}


def test_topp_0_and_1_sample_the_whole_distribution():
    """distributed-llama skips the nucleus cut for topp <= 0 or >= 1: the same draws as plain sampling."""
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05])).astype(np.float32)
    draws = {p: [Sampler(4, 1.0, p, seed=s).sample(logits) for s in range(200)] for p in (0.0, 1.0)}
    assert draws[0.0] == draws[1.0] and set(draws[0.0]) == {0, 1, 2, 3}
