"""Next-token sampling: greedy at temperature 0, else temperature + nucleus (top-p), seeded."""

from __future__ import annotations

import numpy as np

from engine.errors import DllamaError


class Sampler:
    """Draws token ids from logits; only the first `vocab_size` logits (the tokenizer's) are candidates.

    top-p 0 or 1 (or beyond) samples the whole distribution, as distributed-llama does.
    """

    def __init__(self, vocab_size: int, temperature: float = 0.8, topp: float = 0.9, seed: int | None = None):
        self.vocab_size, self.temperature, self.topp = vocab_size, temperature, topp
        self.rng = np.random.default_rng(seed)

    def reseed(self, seed: int | None) -> None:
        self.rng = np.random.default_rng(seed)

    def sample(self, logits: np.ndarray) -> int:
        """One id; argmax (first maximum) when temperature is 0; a NaN or +inf logit is refused."""
        logits = logits[: self.vocab_size]
        top = logits.max()  # NaN propagates through max
        if not np.isfinite(top):
            raise DllamaError(
                f"the model computed a logit of {top} (not a finite number): its weights or settings are "
                "corrupt; check the model file"
            )
        if self.temperature <= 0:
            return int(np.argmax(logits))
        z = (logits.astype(np.float64) - float(top)) / self.temperature  # <= 0: no overflow for a tiny T
        probs = np.exp(z)
        probs /= probs.sum()
        if 0 < self.topp < 1:
            order = np.argsort(-probs, kind="stable")
            cum = np.cumsum(probs[order])
            keep = int(np.searchsorted(cum, self.topp)) + 1  # smallest prefix whose mass reaches topp
            order = order[:keep]
            kept = probs[order] / probs[order].sum()
            return int(order[self.rng.choice(len(order), p=kept)])
        return int(self.rng.choice(len(probs), p=probs))
