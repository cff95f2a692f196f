"""Qwen3-MoE (Qwen3-30B-A3B): Qwen3's attention, and an FFN of routed experts — softmax over the router's
logits, the top `n_active_experts` experts with their probabilities renormalised to sum 1 (as
distributed-llama 0.16 and llama.cpp do), a SwiGLU per expert, their weighted sum. No shared expert. Every
node holds its rows of every expert."""

from __future__ import annotations

from engine.arch.base import (
    ATTENTION,
    EMBEDDING,
    NORMS,
    OUTPUT,
    QK_NORMS,
    Arch,
    Meta,
    TensorSpec,
    dim,
    matrix,
    standard_config,
)
from engine.config import ModelConfig
from engine.graph import Builder, attention, moe_feed_forward


def _experts(name: str, rows, cols, split: str) -> TensorSpec:
    """An expert stack: n_experts matrices of rows x cols."""
    return TensorSpec(name, lambda c: (c.n_experts, rows(c), cols(c)), split)


def _moe(c: ModelConfig) -> int:
    return c.moe_hidden_dim


EXPERTS = (  # .m order per expert: w1 (gate), w2 (down), w3 (up), interleaved expert by expert
    matrix("blk.{l}.ffn_gate_inp.weight", lambda c: c.n_experts, dim, "replicate", m="f32"),
    _experts("blk.{l}.ffn_gate_exps.weight", _moe, dim, "moe:out"),
    _experts("blk.{l}.ffn_down_exps.weight", dim, _moe, "moe:in"),
    _experts("blk.{l}.ffn_up_exps.weight", _moe, dim, "moe:out"),
)
TENSORS = (EMBEDDING, *ATTENTION, *EXPERTS, *QK_NORMS, *NORMS, *OUTPUT)

NEOX = True


def config(m: Meta) -> ModelConfig:
    return standard_config(
        m,
        rope_neox=NEOX,
        n_experts=m.int("expert_count"),
        n_active_experts=m.int("expert_used_count"),
        moe_hidden_dim=m.int("expert_feed_forward_length"),
    )


def layer(b: Builder, index: int) -> None:
    attention(b, index, qk_norm=True)
    moe_feed_forward(b, index, normalize=True)


ARCH = Arch("qwen3moe", 0xABCD02, NEOX, TENSORS, config, layer)
