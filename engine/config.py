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
    """Shapes and constants of a Llama-family decoder; q/k rows follow the interleaved-RoPE convention."""

    arch: str  # "llama"
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

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim
