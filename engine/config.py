"""Model hyper-parameters, independent of the file format they were read from, and their one validation."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from engine.errors import DllamaError

# Sane upper bounds: far above every published model, low enough that a corrupt header cannot make the
# readers plan (or a worker allocate) tensors of absurd sizes before the file size check refuses them.
MAX_WIDTH = 1 << 20  # dim, hidden_dim, moe_hidden_dim, q/kv widths
MAX_LAYERS = 4096
MAX_HEADS = 1 << 16
MAX_HEAD_DIM = 1 << 16
MAX_VOCAB = 1 << 22
MAX_CONTEXT = 1 << 26
MAX_EXPERTS = 4096


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

    def validate(self, where: str, names: Mapping[str, str] | None = None) -> None:
        """Refuse a config no model can have, with one line naming `where` (a file or a peer) and the field
        (spelled as `names` maps field names, e.g. to GGUF keys); every reader and the worker call this."""
        _Check(self, where, names or {}).run()


class _Check:
    """The checks of ModelConfig.validate, each refusal one DllamaError naming the field."""

    def __init__(self, cfg: ModelConfig, where: str, names: Mapping[str, str]):
        self.cfg, self.where, self.names = cfg, where, names

    def fail(self, field: str, value: object, why: str) -> None:
        raise DllamaError(f"{self.where}: {self.names.get(field, field)} {value!r} {why}")

    def int_in(self, field: str, low: int, high: int, value: object = None) -> int:
        value = getattr(self.cfg, field) if value is None else value
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(field, value, "is not an integer")
        if not low <= value <= high:
            self.fail(field, value, f"is out of range (expected {low} to {high})")
        return value

    def positive_float(self, field: str, value: object, high: float = math.inf) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.fail(field, value, "is not a number")
        if not (math.isfinite(value) and 0 < value < high):
            bound = f" and below {high:g}" if high < math.inf else ""
            self.fail(field, value, f"must be a finite number above 0{bound}")
        return value

    def run(self) -> None:
        from engine.arch import registry

        c = self.cfg
        if not isinstance(c.arch, str) or c.arch not in registry():
            self.fail("arch", c.arch, f"is not a supported architecture ({', '.join(sorted(registry()))})")
        self.int_in("dim", 1, MAX_WIDTH)
        self.int_in("n_layers", 1, MAX_LAYERS)
        heads = self.int_in("n_heads", 1, MAX_HEADS)
        kv_heads = self.int_in("n_kv_heads", 1, heads)
        if heads % kv_heads:
            self.fail("n_kv_heads", kv_heads, f"does not divide the {heads} attention heads")
        head_dim = self.int_in("head_dim", 2, MAX_HEAD_DIM)
        if head_dim % 2:
            self.fail("head_dim", head_dim, "is odd (RoPE rotates pairs of values)")
        if heads * head_dim > MAX_WIDTH:
            self.fail("n_heads", heads, f"x head_dim {head_dim} is over {MAX_WIDTH}")
        self.int_in("vocab_size", 1, MAX_VOCAB)
        self.int_in("context_len", 1, MAX_CONTEXT)
        self.positive_float("norm_eps", c.norm_eps, 1.0)
        self.positive_float("rope_theta", c.rope_theta)
        if not isinstance(c.rope_neox, bool):
            self.fail("rope_neox", c.rope_neox, "is not a boolean")
        if c.rope_scaling is not None:
            self.rope_scaling(c.rope_scaling)
        experts = self.int_in("n_experts", 0, MAX_EXPERTS)
        if experts:
            self.int_in("n_active_experts", 1, experts)
            self.int_in("moe_hidden_dim", 1, MAX_WIDTH)
            self.int_in("hidden_dim", 0, MAX_WIDTH)
        else:
            self.int_in("n_active_experts", 0, 0)
            self.int_in("moe_hidden_dim", 0, 0)
            self.int_in("hidden_dim", 1, MAX_WIDTH)

    def rope_scaling(self, rs: object) -> None:
        if not isinstance(rs, RopeScaling):
            self.fail("rope_scaling", rs, "is not a RoPE scaling")
        self.positive_float("rope_scaling.factor", rs.factor)
        low = self.positive_float("rope_scaling.low_freq_factor", rs.low_freq_factor)
        high = self.positive_float("rope_scaling.high_freq_factor", rs.high_freq_factor)
        if not low < high:
            self.fail("rope_scaling.low_freq_factor", low, f"must be below high_freq_factor {high!r}")
        self.int_in("rope_scaling.orig_max_seq_len", 1, MAX_CONTEXT, rs.orig_max_seq_len)
