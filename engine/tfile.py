"""distributed-llama `.t` tokenizer files (spec section 3.1): the in-memory form; reader and writer below."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TFile:
    """The contents of a `.t` file. `vocab[i]` is token i's raw bytes; `scores[i]` its merge score."""

    vocab: list[bytes]
    scores: list[float]
    bos_id: int
    eos_ids: list[int]
    add_bos: bool
    chat_template: str | None = None
    max_token_length: int = 0  # 0: computed from vocab when written
