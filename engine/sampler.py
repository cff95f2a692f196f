"""Next-token sampling: greedy at temperature 0, else temperature + nucleus (top-p), seeded.

The rule is the float64 one: p = softmax(logits / T); with 0 < top-p < 1 keep the smallest prefix of p sorted
descending (stable) whose cumulative mass reaches top-p; draw one uniform u and take the first kept id whose
normalised cumulative mass exceeds u (what numpy's `Generator.choice` does). A full float64 exp and sort cost
10-35 ms at a 50k-150k vocabulary, so `sample` reaches the same id from cheaper numbers: a vectorised softmax
sum (relative error below 1e-10), exact float64 terms only for the few largest logits, and the full float64
computation whenever a decision lies within TOL of its boundary (rare: about TOL over the probability of the
id at the boundary).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
from numba import njit

from engine.errors import DllamaError
from engine.logits import LogitsProcessor

if TYPE_CHECKING:
    from engine.grammar import GrammarMask

TOL = 1e-9  # a decision closer than this (relative) to its boundary is left to the full computation
_Z_FLOOR = -44.0  # terms below exp(-44) count as exp(-44): under 1e-14 of the sum at 152k ids
_TAYLOR = tuple(1.0 / math.factorial(k) for k in range(7, -1, -1))  # exp's coefficients, highest first
_FIRST_K = 64  # largest logits given exact terms first; 8 times more each time their mass falls short


@njit(nogil=True, fastmath={"reassoc", "nsz", "contract"}, boundscheck=False, inline="always")
def _exp_approx(z: float) -> float:
    """exp(z) for z <= 0 without a call (so loops vectorise): exp(z / 128) ** 128, a degree-7 Taylor
    polynomial. Its relative error 128 (|z| / 128) ** 8 / 8! is largest where the term is small: in a sum
    whose largest term is 1 it adds at most 2.5e-16 per term (at z = -8), under 4e-11 for 152k terms."""
    w = max(z, _Z_FLOOR) * (1.0 / 128.0)
    p = 0.0
    for c in _TAYLOR:
        p = p * w + c
    for _ in range(7):
        p = p * p
    return p


@njit(cache=True, nogil=True, fastmath={"reassoc", "nsz", "contract"}, boundscheck=False)
def _softmax_sum(logits: np.ndarray, top: float, inv_t: float) -> float:
    """Sum of exp((logits - top) / T), approximately."""
    s = 0.0
    for i in range(logits.shape[0]):
        s += _exp_approx((np.float64(logits[i]) - top) * inv_t)
    return s


@njit(cache=True, nogil=True, fastmath={"reassoc", "nsz", "contract"}, boundscheck=False)
def _softmax_terms(logits: np.ndarray, top: float, inv_t: float, out: np.ndarray) -> float:
    """out[i] = exp((logits[i] - top) / T) approximately; returns their sum."""
    s = 0.0
    for i in range(logits.shape[0]):
        out[i] = _exp_approx((np.float64(logits[i]) - top) * inv_t)
        s += out[i]
    return s


@njit(cache=True, nogil=True, boundscheck=False)
def _first_above(terms: np.ndarray, target: float, margin: float) -> int:
    """The first i whose running sum of terms exceeds target; -1 if none does or a running sum lies within
    margin of target."""
    below = 0.0
    for i in range(terms.shape[0]):
        at = below + terms[i]
        if at > target:
            return i if at - target > margin and target - below > margin else -1
        below = at
    return -1


class Sampler:
    """Draws token ids from logits; only the first `vocab_size` logits (the tokenizer's) are candidates.

    top-p 0 or 1 (or beyond) samples the whole distribution, as distributed-llama does. A `processor`
    (penalties, logit bias) changes the logits before each draw and is told each drawn token; so does a
    `grammar` (constrained decoding), applied after it.
    """

    def __init__(
        self,
        vocab_size: int,
        temperature: float = 0.8,
        topp: float = 0.9,
        seed: int | None = None,
        processor: LogitsProcessor | None = None,
        grammar: GrammarMask | None = None,
    ):
        self.vocab_size, self.temperature, self.topp = vocab_size, temperature, topp
        self.processor = processor if processor is not None and processor.active else None
        self.grammar = grammar
        self.rng = np.random.default_rng(seed)
        self._terms = np.zeros(1, np.float64)
        one = np.zeros(1, np.float32)  # load the compiled kernels now, not inside the first timed draw
        _softmax_sum(one, 0.0, 1.0)
        _softmax_terms(one, 0.0, 1.0, self._terms)
        _first_above(self._terms, 0.0, 0.0)

    def reseed(self, seed: int | None) -> None:
        self.rng = np.random.default_rng(seed)

    def sample(self, logits: np.ndarray) -> int:
        """One id; argmax (first maximum) when temperature is 0; a NaN or +inf logit is refused."""
        if self.processor is None and self.grammar is None:
            return self._draw(logits[: self.vocab_size])
        if self.processor is not None:
            logits = self.processor(logits)
        if self.grammar is not None:
            logits = self.grammar(logits)
        token = self._draw(logits[: self.vocab_size])
        if self.processor is not None:
            self.processor.accept(token)
        if self.grammar is not None:
            self.grammar.accept(token)
        return token

    def _draw(self, logits: np.ndarray) -> int:
        """The draw from logits already cut to the vocabulary."""
        top = logits.max()  # NaN propagates through max
        if not np.isfinite(top):
            raise DllamaError(
                f"the model computed a logit of {top} (not a finite number): its weights or settings are "
                "corrupt; check the model file"
            )
        if self.temperature <= 0:
            return int(np.argmax(logits))
        top, u = float(top), self.rng.random()
        inv_t = 1.0 / max(self.temperature, 1e-300)
        if 0 < self.topp < 1 and len(logits) > 1:
            token = self._nucleus(logits, top, _softmax_sum(logits, top, inv_t), u)
        else:
            if len(self._terms) < len(logits):
                self._terms = np.empty(len(logits), np.float64)
            terms = self._terms[: len(logits)]
            total = _softmax_terms(logits, top, inv_t, terms)
            token = _first_above(terms, u * total, TOL * total)
        return token if token >= 0 else self._exact(logits, top, u)

    def _exp(self, logits: np.ndarray, top: float) -> np.ndarray:
        """exp((logits - top) / T) in float64, bit for bit as the rule computes it."""
        return np.exp((logits.astype(np.float64) - top) / self.temperature)

    def _nucleus(self, logits: np.ndarray, top: float, total: float, u: float) -> int:
        """The nucleus draw from exact terms of the largest logits; -1 when a decision is too close to call.

        Only ids with p >= (1 - topp) / (n - 1) can be kept (the ids after a kept one, at most n - 1 and none
        larger, hold the mass 1 - topp that the ids before it leave), so only those are looked at.
        """
        thr = max(1.0 - self.topp - TOL, 0.0) / (len(logits) - 1) * total * (1 - TOL)
        cut = max(top + self.temperature * (math.log(thr) - 1e-3), -3e38) if thr > 0 else -np.inf
        cut32 = np.float32(cut)
        if cut32 > cut:
            cut32 = np.nextafter(cut32, np.float32(-np.inf))
        ids = np.flatnonzero(logits >= cut32)
        goal, k = self.topp * total, min(_FIRST_K, len(ids))
        while True:
            sel = ids if k == len(ids) else ids[np.sort(np.argpartition(-logits[ids], k - 1)[:k])]
            e = self._exp(logits[sel], top)
            order = np.argsort(
                -e, kind="stable"
            )  # distinct float32 logits give terms far more than 1 ulp apart
            cum = np.cumsum(e[order])
            keep = int(np.searchsorted(cum, goal))
            # the k largest are the first k of the rule's order, except among ties with the smallest of them
            if k == len(ids) or (keep < k and e[order[keep]] > e[order[-1]]):
                break
            k = min(8 * k, len(ids))
        if keep >= k or cum[keep] < goal * (1 + TOL) or (keep > 0 and cum[keep - 1] > goal * (1 - TOL)):
            return -1
        i = _first_above(e[order[: keep + 1]], u * cum[keep], TOL * cum[keep])
        return int(sel[order[i]]) if i >= 0 else -1

    def _exact(self, logits: np.ndarray, top: float, u: float) -> int:
        """The rule in full float64 (the draw as numpy's choice makes it from u), for close decisions."""
        probs = self._exp(logits, top)
        probs /= probs.sum()
        order = np.arange(len(probs))
        if 0 < self.topp < 1:
            order = np.argsort(-probs, kind="stable")
            keep = int(np.searchsorted(np.cumsum(probs[order]), self.topp)) + 1
            order = order[:keep]
        kept = probs[order] / probs[order].sum()
        cdf = np.cumsum(kept)
        cdf /= cdf[-1]
        return int(order[np.searchsorted(cdf, u, side="right")])
