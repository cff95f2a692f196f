"""Logits processing before a draw, and log-probabilities of the raw logits.

`LogitsProcessor` applies, in this order: a logit bias (values added to given ids), the repetition penalty of
vLLM and llama.cpp (every id seen in the prompt or the generated tokens: a positive logit divided by it, a
negative one multiplied), then OpenAI's frequency and presence penalties over the generated tokens
(logit -= count * frequency + (count > 0) * presence). Each step touches only the ids seen or biased, never
the whole vocabulary beyond one copy of the logits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from engine.errors import DllamaError

PENALTY_LIMIT = 2.0  # OpenAI's range for presence and frequency penalties: -2..2
BIAS_LIMIT = 100.0  # OpenAI's range for a logit bias: -100..100


class LogitsProcessor:
    """Penalties and bias over the first `vocab_size` logits; `accept` records each drawn token."""

    def __init__(
        self,
        vocab_size: int,
        presence: float = 0.0,
        frequency: float = 0.0,
        repetition: float = 1.0,
        bias: Mapping[int, float] | None = None,
        prompt: Sequence[int] = (),
    ):
        for name, value in (("presence", presence), ("frequency", frequency)):
            if not -PENALTY_LIMIT <= value <= PENALTY_LIMIT:
                raise DllamaError(f"the {name} penalty must lie in -2..2 (got {value})")
        if not repetition > 0:
            raise DllamaError(f"the repetition penalty must be greater than 0 (got {repetition})")
        bias = dict(bias or {})
        for token, value in bias.items():
            if not 0 <= token < vocab_size:
                raise DllamaError(f"logit bias: token {token} is not in the vocabulary (0..{vocab_size - 1})")
            if not -BIAS_LIMIT <= value <= BIAS_LIMIT:
                raise DllamaError(f"the logit bias of token {token} must lie in -100..100 (got {value})")
        self.vocab_size = vocab_size
        self.presence, self.frequency, self.repetition = presence, frequency, repetition
        self._bias_ids = np.fromiter(bias.keys(), np.int64, len(bias))
        self._bias = np.fromiter(bias.values(), np.float32, len(bias))
        self._counts = np.zeros(vocab_size, np.int32)  # generated tokens per id
        self._generated = np.empty(vocab_size, np.int64)  # ids generated at least once, first seen first
        self._n_generated = 0
        self._seen = np.zeros(vocab_size, bool)  # ids in the prompt or generated
        prompt_ids = np.unique(np.asarray(prompt, np.int64))
        prompt_ids = prompt_ids[(prompt_ids >= 0) & (prompt_ids < vocab_size)]
        self._seen[prompt_ids] = True
        self._seen_ids = np.empty(vocab_size, np.int64)
        self._seen_ids[: len(prompt_ids)] = prompt_ids
        self._n_seen = len(prompt_ids)

    @property
    def active(self) -> bool:
        """Whether it changes any logit at all (an inactive one need not be applied)."""
        return bool(self.presence or self.frequency or self.repetition != 1.0 or len(self._bias))

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        """The processed copy of the first `vocab_size` logits (float32)."""
        out = np.array(logits[: self.vocab_size], np.float32)
        if len(self._bias):
            out[self._bias_ids] += self._bias  # the ids are distinct
        if self.repetition != 1.0 and self._n_seen:
            ids = self._seen_ids[: self._n_seen]
            x = out[ids]
            out[ids] = np.where(x > 0, x / self.repetition, x * self.repetition)
        if (self.presence or self.frequency) and self._n_generated:
            ids = self._generated[: self._n_generated]
            out[ids] -= self._counts[ids] * np.float32(self.frequency) + np.float32(self.presence)
        return out

    def accept(self, token: int) -> None:
        """Record a drawn token (counted for the penalties from the next draw on)."""
        if not 0 <= token < self.vocab_size:
            return
        if self._counts[token] == 0:
            self._generated[self._n_generated] = token
            self._n_generated += 1
        self._counts[token] += 1
        if not self._seen[token]:
            self._seen[token] = True
            self._seen_ids[self._n_seen] = token
            self._n_seen += 1


def log_softmax_at(
    logits: np.ndarray, vocab_size: int, token: int, top: int
) -> tuple[float, list[tuple[int, float]]]:
    """log p(token) under softmax(logits[:vocab_size]) in float64, and the `top` most likely (id, log p),
    most likely first."""
    x = np.asarray(logits[:vocab_size], np.float64)
    m = float(x.max())
    lse = m + float(np.log(np.exp(x - m).sum()))
    best: list[tuple[int, float]] = []
    if top > 0:
        k = min(top, len(x))
        part = np.argpartition(-x, k - 1)[:k]
        order = part[np.lexsort((part, -x[part]))]
        best = [(int(i), float(x[i] - lse)) for i in order]
    return float(x[token] - lse), best
