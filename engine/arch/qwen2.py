"""Qwen2 / Qwen2.5: Llama's layer with q/k/v biases and NeoX (half-split) RoPE on unpermuted q/k rows; the
classifier is untied in most files. distributed-llama has no `.m` type for it (its format has no biases)."""

from __future__ import annotations

from engine.arch.base import (
    ATTENTION,
    DENSE_FFN,
    EMBEDDING,
    NORMS,
    OUTPUT,
    Arch,
    Meta,
    kv_dim,
    q_dim,
    standard_config,
    vector,
)
from engine.config import ModelConfig
from engine.graph import Builder, attention, feed_forward

BIASES = (
    vector("blk.{l}.attn_q.bias", q_dim, "q:out", m=None),
    vector("blk.{l}.attn_k.bias", kv_dim, "kv:out", m=None),
    vector("blk.{l}.attn_v.bias", kv_dim, "kv:out", m=None),
)
TENSORS = (EMBEDDING, *ATTENTION, *BIASES, *DENSE_FFN, *NORMS, *OUTPUT)

NEOX = True


def config(m: Meta) -> ModelConfig:
    return standard_config(m, rope_neox=NEOX)


def layer(b: Builder, index: int) -> None:
    attention(b, index, qkv_bias=True)
    feed_forward(b, index)


ARCH = Arch("qwen2", None, NEOX, TENSORS, config, layer)
