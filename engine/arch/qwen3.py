"""Qwen3 (dense): Llama's layer with a per-head RMSNorm of q and k before NeoX RoPE, a head_dim of its own
(128, whatever dim / heads is), no biases."""

from __future__ import annotations

from engine.arch.base import (
    ATTENTION,
    DENSE_FFN,
    EMBEDDING,
    NORMS,
    OUTPUT,
    QK_NORMS,
    Arch,
    HFConfig,
    Meta,
    hf_standard_config,
    standard_config,
)
from engine.config import ModelConfig
from engine.graph import Builder, attention, feed_forward

TENSORS = (EMBEDDING, *ATTENTION, *DENSE_FFN, *QK_NORMS, *NORMS, *OUTPUT)  # .m order: q/k norms first

NEOX = True


def config(m: Meta) -> ModelConfig:
    return standard_config(m, rope_neox=NEOX)


def hf_config(h: HFConfig) -> ModelConfig:
    if h.get("use_sliding_window", False):
        h.refuse("use_sliding_window", "sliding-window attention is not implemented")
    return hf_standard_config(h, "qwen3")


def layer(b: Builder, index: int) -> None:
    attention(b, index, qk_norm=True)
    feed_forward(b, index)


ARCH = Arch("qwen3", 0xABCD01, NEOX, TENSORS, config, layer, ("qwen3",), hf_config)
