"""Next-token sampling: greedy at temperature 0, else temperature + nucleus (top-p), seeded."""

from __future__ import annotations

import numpy as np


class Sampler:
    """Draws token ids from logits; only the first `vocab_size` logits (the tokenizer's) are candidates."""

    def __init__(self, vocab_size: int, temperature: float = 0.8, topp: float = 0.9, seed: int | None = None):
        self.vocab_size, self.temperature, self.topp = vocab_size, temperature, topp
        self.rng = np.random.default_rng(seed)

    def reseed(self, seed: int | None) -> None:
        self.rng = np.random.default_rng(seed)

    def sample(self, logits: np.ndarray) -> int:
        """One id; argmax (first maximum) when temperature is 0."""
        logits = logits[: self.vocab_size]
        if self.temperature <= 0:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / self.temperature
        probs = np.exp(z - z.max())
        probs /= probs.sum()
        if 0 < self.topp < 1:
            order = np.argsort(-probs, kind="stable")
            cum = np.cumsum(probs[order])
            keep = int(np.searchsorted(cum, self.topp)) + 1  # smallest prefix whose mass reaches topp
            order = order[:keep]
            kept = probs[order] / probs[order].sum()
            return int(order[self.rng.choice(len(order), p=kept)])
        return int(self.rng.choice(len(probs), p=probs))
