"""Generation as a generator (mlx-examples style): prefill the prompt, then sample token by token.

Each yielded event carries the timings of the forward pass behind it, so every front end (CLI, chat, API)
reports the same metrics: tokens/s end to end (wall clock: sampling, detokenising, the network and the
consumer's own work between tokens included), tokens/s of the forward passes alone, and weight bandwidth.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from engine.runner import ForwardStats, Runner
from engine.sampler import Sampler
from engine.tokenizer import Tokenizer


@dataclass
class Event:
    """A prefill batch (token None) or a generated token with its text piece (complete UTF-8 only)."""

    kind: str  # "prefill" | "token"
    stats: ForwardStats | None  # the forward pass behind this event (None: the token came from the prefill)
    token: int | None = None
    text: str = ""
    n_tokens: int = 0  # prompt tokens in a prefill batch
    logits: np.ndarray | None = None  # the model's raw logits the token was drawn from


@dataclass
class Metrics:
    """Totals of one generation, for the summary and --json."""

    prefill: ForwardStats = field(default_factory=ForwardStats)
    decode: ForwardStats = field(default_factory=ForwardStats)
    generated: list[int] = field(default_factory=list)
    stop_reason: str = "length"  # "eos", "length" (max_new_tokens) or "context" (the KV cache is full)
    first_token_s: float = 0.0  # wall clock from the start to the first generated token (prefill + sampling)
    decode_wall_s: float = 0.0  # wall clock from the first generated token to the last
    sample_s: float = 0.0  # time spent sampling, all tokens

    @staticmethod
    def rate(st: ForwardStats) -> float:
        """Tokens per second of the forward passes alone (compute + network sync)."""
        busy = st.eval_s + st.sync_s
        return st.n_tokens / busy if busy > 0 else 0.0

    def prefill_rate(self) -> float:
        """Prompt tokens per second of wall clock until the first generated token."""
        return self.prefill.n_tokens / self.first_token_s if self.first_token_s > 0 else 0.0

    def decode_rate(self) -> float:
        """Generated tokens per second of wall clock after the first: one decode pass, one draw and its
        detokenising per token, as a user sees them arrive."""
        return (len(self.generated) - 1) / self.decode_wall_s if self.decode_wall_s > 0 else 0.0


def generate(
    runner: Runner,
    tokenizer: Tokenizer,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    sampler: Sampler,
    start_pos: int = 0,
    stop_at_eos: bool = True,
    metrics: Metrics | None = None,
    reply_start: bool = False,
) -> Iterator[Event]:
    """Prefill `prompt_ids` at `start_pos` (batches of runner.max_batch), then sample up to `max_new_tokens`.

    The first generated token comes from the last prompt token's logits; a sampled EOS ends generation and
    is not fed back. The KV cache then holds start_pos + len(prompt_ids) + len(generated) - 1 positions.
    `reply_start` (chat) drops a SentencePiece dummy-prefix space from the first piece, as HF decoding does.
    """
    m = metrics if metrics is not None else Metrics()
    pos, logits, t0 = start_pos, None, time.perf_counter()
    for i in range(0, len(prompt_ids), runner.max_batch):
        chunk = list(prompt_ids[i : i + runner.max_batch])
        st = ForwardStats()
        is_last = i + runner.max_batch >= len(prompt_ids)
        logits = runner.forward(chunk, pos, "last" if is_last else "none", st)
        pos += len(chunk)
        _accumulate(m.prefill, st)
        yield Event("prefill", st, n_tokens=len(chunk))
    stream = tokenizer.stream(at_start=reply_start)
    eos = set(tokenizer.eos_ids)
    st = None
    for step in range(max_new_tokens):
        t_sample = time.perf_counter()
        token = sampler.sample(logits)
        m.generated.append(token)
        m.sample_s += time.perf_counter() - t_sample
        if stop_at_eos and token in eos:
            m.stop_reason = "eos"
            text = stream.flush()
            _clock(m, t0, step)
            yield Event("token", st, token, text, logits=logits)
            return
        full = pos >= runner.max_seq_len
        is_final = full or step == max_new_tokens - 1
        text = stream.push(token) + (stream.flush() if is_final else "")
        _clock(m, t0, step)
        yield Event("token", st, token, text, logits=logits)
        if is_final:
            m.stop_reason = "context" if full else "length"
            return
        st = ForwardStats()
        logits = runner.forward([token], pos, "last", st)
        pos += 1
        _accumulate(m.decode, st)


def _clock(m: Metrics, t0: float, step: int) -> None:
    """Wall clock at a generated token, its text ready: the first ends the prefill, the rest the decode."""
    now = time.perf_counter() - t0
    if step == 0:
        m.first_token_s = now
    else:
        m.decode_wall_s = now - m.first_token_s


def _accumulate(total: ForwardStats, st: ForwardStats) -> None:
    total.n_tokens += st.n_tokens
    total.eval_s += st.eval_s
    total.sync_s += st.sync_s
    total.sent += st.sent
    total.recv += st.recv
