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
    HFConfig,
    Meta,
    TensorSpec,
    dim,
    hf_standard_config,
    matrix,
    standard_config,
)
from engine.config import ModelConfig
from engine.graph import Builder, attention, moe_feed_forward


def _experts(name: str, rows, cols, split: str, hf: str) -> TensorSpec:
    """An expert stack: n_experts matrices of rows x cols (one HF tensor per expert)."""
    return TensorSpec(name, lambda c: (c.n_experts, rows(c), cols(c)), split, hf=hf)


def _moe(c: ModelConfig) -> int:
    return c.moe_hidden_dim


_MLP = "model.layers.{l}.mlp."
EXPERTS = (  # .m order per expert: w1 (gate), w2 (down), w3 (up), interleaved expert by expert
    matrix(
        "blk.{l}.ffn_gate_inp.weight",
        lambda c: c.n_experts,
        dim,
        "replicate",
        m="f32",
        hf=_MLP + "gate.weight",
    ),
    _experts("blk.{l}.ffn_gate_exps.weight", _moe, dim, "moe:out", _MLP + "experts.{e}.gate_proj.weight"),
    _experts("blk.{l}.ffn_down_exps.weight", dim, _moe, "moe:in", _MLP + "experts.{e}.down_proj.weight"),
    _experts("blk.{l}.ffn_up_exps.weight", _moe, dim, "moe:out", _MLP + "experts.{e}.up_proj.weight"),
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


def hf_config(h: HFConfig) -> ModelConfig:
    """transformers' Qwen3MoeConfig: every layer sparse, top-k probabilities renormalised, no shared
    expert."""
    if not h.flag("norm_topk_prob", False):
        h.refuse("norm_topk_prob", "the engine renormalises the top-k router probabilities")
    if h.int("decoder_sparse_step", 1) != 1 or h.get("mlp_only_layers", []):
        h.refuse("mlp_only_layers", "dense layers between the expert layers are not implemented")
    if h.int("shared_expert_intermediate_size", 0):
        h.refuse("shared_expert_intermediate_size", "Qwen3-MoE has no shared expert")
    return hf_standard_config(
        h,
        "qwen3moe",
        n_experts=h.int("num_experts"),
        n_active_experts=h.int("num_experts_per_tok"),
        moe_hidden_dim=h.int("moe_intermediate_size"),
    )


def layer(b: Builder, index: int) -> None:
    attention(b, index, qk_norm=True)
    moe_feed_forward(b, index, normalize=True)


ARCH = Arch("qwen3moe", 0xABCD02, NEOX, TENSORS, config, layer, ("qwen3_moe",), hf_config)
