"""Llama (and Mistral, SmolLM2, DeepSeek-R1-Distill-Llama): pre-norm GQA attention with interleaved RoPE on
permuted q/k rows (llama.cpp's and distributed-llama's converters both permute), SwiGLU FFN, optional
Llama 3.1 RoPE scaling (metadata keys or a rope_freqs tensor), optionally tied classifier."""

from __future__ import annotations

import dataclasses

from engine.arch.base import (
    ATTENTION,
    DENSE_FFN,
    EMBEDDING,
    NORMS,
    OUTPUT,
    Arch,
    HFConfig,
    Meta,
    hf_standard_config,
    standard_config,
    vector,
)
from engine.config import ModelConfig
from engine.graph import Builder, attention, feed_forward

TENSORS = (
    EMBEDDING,
    # Llama 3.1 RoPE frequency divisors, as llama.cpp's converter stores them; .m files use header keys
    vector("rope_freqs.weight", lambda c: c.head_dim // 2, optional=True, m=None),
    *ATTENTION,
    *DENSE_FFN,
    *NORMS,
    *OUTPUT,
)

NEOX = False


def config(m: Meta) -> ModelConfig:
    return standard_config(m, rope_neox=NEOX)


def hf_config(h: HFConfig) -> ModelConfig:
    """Mistral v0.1's `sliding_window` lets a token attend only to that many before it; within a context that
    long that is full attention, so the context is capped at the window and the result stays exact."""
    cfg = hf_standard_config(h, "llama")
    if h.get("sliding_window") is not None:
        cfg = dataclasses.replace(cfg, context_len=min(cfg.context_len, h.int("sliding_window")))
    return cfg


def layer(b: Builder, index: int) -> None:
    attention(b, index)
    feed_forward(b, index)


ARCH = Arch("llama", 0xABCD00, NEOX, TENSORS, config, layer, ("llama", "mistral"), hf_config)
