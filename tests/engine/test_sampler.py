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


def reference_draws(logits: np.ndarray, temperature: float, topp: float, rng, count: int) -> list[int]:
    """The float64 rule as first written (full exp, stable sort, numpy's choice): what sampling must match."""
    top = logits.max()
    probs = np.exp((logits.astype(np.float64) - float(top)) / temperature)
    probs /= probs.sum()
    order = np.arange(len(probs))
    if 0 < topp < 1:
        order = np.argsort(-probs, kind="stable")
        keep = int(np.searchsorted(np.cumsum(probs[order]), topp)) + 1
        order = order[:keep]
    kept = probs[order] / probs[order].sum()
    return [int(order[rng.choice(len(order), p=kept)]) for _ in range(count)]


def _logit_sets() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(12)
    peaked = (rng.normal(size=152064) * 2.5).astype(np.float32)
    peaked[rng.choice(152064, 40, replace=False)] += rng.uniform(6, 14, 40).astype(np.float32)
    ties = np.repeat(rng.normal(size=500).astype(np.float32) * 3, 8)  # every value 8 times: order by id
    return {
        "peaked 152k": peaked,
        "flat 4k": rng.normal(size=4096).astype(np.float32) * 0.5,
        "ties": ties,
        "two": np.array([0.3, -0.2], np.float32),
        "one": np.array([1.5], np.float32),
    }


@pytest.mark.parametrize("name", list(_logit_sets()))
def test_seeded_draws_equal_the_float64_rule(name):
    logits = _logit_sets()[name]
    for temperature, topp in ((0.8, 0.9), (1.0, 0.5), (0.6, 0.99), (1.7, 0.05), (0.8, 1.0), (1.2, 0.0)):
        for seed in (0, 1):
            s, rng = Sampler(len(logits), temperature, topp, seed=seed), np.random.default_rng(seed)
            ours = [s.sample(logits) for _ in range(40)]
            assert ours == reference_draws(logits, temperature, topp, rng, 40), (temperature, topp, seed)


def test_decisions_on_a_boundary_match_the_rule(monkeypatch):
    """Four equal logits and top-p 0.5: the mass of two lands exactly on top-p, which the full rule decides
    (keeping ids 0 and 1: the cut is at the first prefix whose mass reaches top-p)."""
    calls = []
    exact = Sampler._exact
    monkeypatch.setattr(Sampler, "_exact", lambda self, *a: calls.append(1) or exact(self, *a))
    logits = np.zeros(4, np.float32)
    s = Sampler(4, 1.0, 0.5, seed=4)
    ref = np.random.default_rng(4)
    ours = [s.sample(logits) for _ in range(50)]
    assert ours == reference_draws(logits, 1.0, 0.5, ref, 50)
    assert set(ours) == {0, 1} and len(calls) == 50


def test_a_peaked_vocabulary_never_needs_the_full_computation(monkeypatch):
    """The regression guard for speed (counts, does not time): no draw falls back to the full exp + sort."""
    calls = []
    monkeypatch.setattr(Sampler, "_exact", lambda self, *a: calls.append(1) or 0)
    logits = _logit_sets()["peaked 152k"]
    s = Sampler(len(logits), 0.8, 0.9, seed=9)
    for _ in range(200):
        s.sample(logits)
    assert calls == []
