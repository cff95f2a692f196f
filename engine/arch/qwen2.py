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
    HFConfig,
    Meta,
    hf_standard_config,
    kv_dim,
    q_dim,
    standard_config,
    vector,
)
from engine.config import ModelConfig
from engine.graph import Builder, attention, feed_forward

_ATT = "model.layers.{l}.self_attn."
BIASES = (
    vector("blk.{l}.attn_q.bias", q_dim, "q:out", m=None, hf=_ATT + "q_proj.bias"),
    vector("blk.{l}.attn_k.bias", kv_dim, "kv:out", m=None, hf=_ATT + "k_proj.bias"),
    vector("blk.{l}.attn_v.bias", kv_dim, "kv:out", m=None, hf=_ATT + "v_proj.bias"),
)
TENSORS = (EMBEDDING, *ATTENTION, *BIASES, *DENSE_FFN, *NORMS, *OUTPUT)

NEOX = True


def config(m: Meta) -> ModelConfig:
    return standard_config(m, rope_neox=NEOX)


def hf_config(h: HFConfig) -> ModelConfig:
    if h.get("use_sliding_window", False):
        h.refuse("use_sliding_window", "sliding-window attention is not implemented")
    return hf_standard_config(h, "qwen2")


def layer(b: Builder, index: int) -> None:
    attention(b, index, qkv_bias=True)
    feed_forward(b, index)


ARCH = Arch("qwen2", None, NEOX, TENSORS, config, layer, ("qwen2",), hf_config)
