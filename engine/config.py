"""Model hyper-parameters, independent of the file format they were read from."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1-style RoPE frequency scaling (applied when factor != 1)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    orig_max_seq_len: int


@dataclass(frozen=True)
class ModelConfig:
    """Shapes and constants of a decoder-only transformer; `arch` names its description in engine/arch/."""

    arch: str  # "llama", "qwen2", "qwen3", "qwen3moe"
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    context_len: int  # the model's own context length
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_neox: bool = False  # False: interleaved pairs (Llama); True: half-split (NeoX/Falcon)
    rope_scaling: RopeScaling | None = None
    n_experts: int = 0  # mixture of experts: experts per layer (0: a dense FFN of hidden_dim)
    n_active_experts: int = 0  # experts each token is routed to
    moe_hidden_dim: int = 0  # FFN width of one expert

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim
