"""What an architecture description is: its tensor table, its GGUF metadata reader and its layer block.

A `TensorSpec` is one row of the table every part of the engine reads: the GGUF reader and the `.m`
reader/writer (names, shapes, stream order), slicing (how nodes share a tensor) and the worker (what it
expects to receive). Names use GGUF spelling; `{l}` stands for the layer index.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from engine.config import ModelConfig, RopeScaling
from engine.errors import DllamaError
from engine.weight_types import weight_type
from engine.weights import Weight

if TYPE_CHECKING:
    from engine.graph import Builder

# How the nodes of a cluster share a tensor. "<range>:out" cuts output rows (a vector's elements) to the
# node's range, "<range>:in" cuts input columns; the ranges are the node's query heads (q), KV heads (kv),
# dense FFN rows (ffn), expert FFN rows (moe) and vocabulary rows (vocab) of engine.slicing.NodeSlice.
SPLITS = (
    "replicate",
    "root",
    "q:out",
    "kv:out",
    "q:in",
    "ffn:out",
    "ffn:in",
    "moe:out",
    "moe:in",
    "vocab:out",
)


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of an architecture. `shape` gives (n,) for vectors, (rows, cols) for matrices and
    (experts, rows, cols) for expert stacks. `m` is its type in a distributed-llama `.m` file: "f32" (always
    f32), "wt" (the file's weight type) or None (`.m` files cannot hold it). A tensor `tied_to` another
    stands for that one where the file lacks it."""

    name: str
    shape: Callable[[ModelConfig], tuple[int, ...]]
    split: str
    optional: bool = False
    m: str | None = "wt"
    tied_to: str | None = None  # a missing optional tensor is this one (a classifier tied to the embedding)

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"{self.name}: unknown split rule {self.split!r}")

    @property
    def per_layer(self) -> bool:
        return "{l}" in self.name


@dataclass(frozen=True)
class Arch:
    """An architecture: GGUF `general.architecture` name, `.m` arch_type (None: none exists), its RoPE
    pairing, its tensor table (in `.m` stream order: leading global tensors, the per-layer ones, trailing
    global ones), the metadata reader and the layer block of the forward pass."""

    name: str
    m_arch_type: int | None
    neox: bool  # q/k pairs rotated half-split (NeoX) whatever a file says; False: a `.m` rope_type decides
    tensors: tuple[TensorSpec, ...]
    config: Callable[[Meta], ModelConfig]
    layer: Callable[[Builder, int], None]

    def table(self, cfg: ModelConfig) -> Iterator[tuple[str, TensorSpec]]:
        """(name, spec) of every tensor of a model of this config, in stream order."""
        layered = [i for i, s in enumerate(self.tensors) if s.per_layer]
        first, last = layered[0], layered[-1]
        for s in self.tensors[:first]:
            yield s.name, s
        for layer in range(cfg.n_layers):
            for s in self.tensors[first : last + 1]:
                yield s.name.format(l=layer), s
        for s in self.tensors[last + 1 :]:
            yield s.name, s

    def collect(
        self, cfg: ModelConfig, found: Callable[[str], Weight | None], path: str
    ) -> dict[str, Weight]:
        """A model file's tensors by name, checked against the table: every required one present with the
        shape the config implies, vectors in a float type; a missing tied tensor is the one it is tied to."""
        weights: dict[str, Weight] = {}
        for name, spec in self.table(cfg):
            w = found(name)
            if w is None:
                if spec.tied_to is not None:
                    weights[name] = weights[spec.tied_to]
                elif not spec.optional:
                    raise DllamaError(f"{path}: required tensor {name} is missing")
                continue
            shape = spec.shape(cfg)
            want = as_weight_shape(shape)
            if w.shape != want:
                need, got = "x".join(map(str, want)), "x".join(map(str, w.shape))
                raise DllamaError(f"{path}: tensor {name} is {got}, the config needs {need}")
            if len(shape) == 1 and weight_type(w.dtype).quantized:
                raise DllamaError(f"{path}: vector {name} is {w.dtype}; vectors must be F32, F16 or BF16")
            weights[name] = w
        return weights


def as_weight_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A table shape as Weight.shape spells it: vectors (n,) become (1, n)."""
    return (1, *shape) if len(shape) == 1 else tuple(shape)


# ---------------------------------------------------------------------------------------------------------
# GGUF metadata: llama.cpp's key names, shared by every architecture ({arch}.embedding_length, ...).
# ---------------------------------------------------------------------------------------------------------


class Meta:
    """GGUF metadata of one file, read with the architecture's key prefix and clear errors."""

    def __init__(self, meta: dict[str, Any], path: str, arch: str):
        self.meta, self.path, self.arch = meta, path, arch

    def has(self, key: str) -> bool:
        return f"{self.arch}.{key}" in self.meta

    def int(self, key: str, default: int | None = None) -> int:
        full = f"{self.arch}.{key}"
        value = self.meta.get(full, default)
        if value is None:
            raise DllamaError(f"{self.path}: GGUF metadata key {full} is missing")
        if isinstance(value, bool) or not isinstance(value, int):
            raise DllamaError(f"{self.path}: GGUF metadata key {full} = {value!r} is not a single integer")
        return value

    def float(self, key: str, default: float) -> float:
        """A float32 metadata value as the shortest decimal that rounds to it (1e-05, not 9.99999974e-06)."""
        import numpy as np

        full = f"{self.arch}.{key}"
        value = self.meta.get(full, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise DllamaError(f"{self.path}: GGUF metadata key {full} = {value!r} is not a number")
        return float(str(np.float32(value)))

    def str(self, key: str, default: str | None = None) -> str | None:
        value = self.meta.get(f"{self.arch}.{key}", default)
        return None if value is None else str(value)


def standard_config(m: Meta, *, rope_neox: bool, **extra: Any) -> ModelConfig:
    """ModelConfig from the keys llama.cpp writes for every decoder of this family; `extra` sets the rest
    (mixture-of-experts sizes)."""
    dim = m.int("embedding_length")
    n_heads = m.int("attention.head_count")
    if m.has("attention.key_length"):
        head_dim = m.int("attention.key_length")
    elif m.has("rope.dimension_count"):
        head_dim = m.int("rope.dimension_count")
    elif n_heads > 0 and dim % n_heads == 0:
        head_dim = dim // n_heads
    else:
        raise DllamaError(
            f"{m.path}: {m.arch}.embedding_length {dim} is not a multiple of "
            f"{m.arch}.attention.head_count {n_heads}"
        )
    if m.has("vocab_size"):
        vocab = m.int("vocab_size")
    elif m.meta.get("tokenizer.ggml.tokens"):
        vocab = len(m.meta["tokenizer.ggml.tokens"])
    else:
        raise DllamaError(
            f"{m.path}: neither {m.arch}.vocab_size nor tokenizer.ggml.tokens gives the vocab size"
        )
    return ModelConfig(
        arch=m.arch,
        dim=dim,
        hidden_dim=m.int("feed_forward_length", 0 if extra.get("n_experts") else None),
        n_layers=m.int("block_count"),
        n_heads=n_heads,
        n_kv_heads=m.int("attention.head_count_kv", n_heads),
        head_dim=head_dim,
        vocab_size=vocab,
        context_len=m.int("context_length"),
        norm_eps=m.float("attention.layer_norm_rms_epsilon", 1e-5),
        rope_theta=m.float("rope.freq_base", 10000.0),
        rope_neox=rope_neox,
        rope_scaling=rope_scaling(m),
        **extra,
    )


def gguf_key_names(arch: str) -> dict[str, str]:
    """The GGUF metadata key each ModelConfig field is read from, so a refused value is named as the file
    spells it (ModelConfig.validate)."""
    keys = {
        "dim": "embedding_length",
        "hidden_dim": "feed_forward_length",
        "n_layers": "block_count",
        "n_heads": "attention.head_count",
        "n_kv_heads": "attention.head_count_kv",
        "context_len": "context_length",
        "norm_eps": "attention.layer_norm_rms_epsilon",
        "rope_theta": "rope.freq_base",
        "rope_scaling.factor": "rope.scaling.factor",
        "rope_scaling.low_freq_factor": "rope.scaling.low_freq_factor",
        "rope_scaling.high_freq_factor": "rope.scaling.high_freq_factor",
        "rope_scaling.orig_max_seq_len": "rope.scaling.original_context_length",
        "n_experts": "expert_count",
        "n_active_experts": "expert_used_count",
        "moe_hidden_dim": "expert_feed_forward_length",
    }
    return {field: f"{arch}.{key}" for field, key in keys.items()}


def rope_scaling(m: Meta) -> RopeScaling | None:
    """Llama 3.1 frequency scaling from `{arch}.rope.scaling.*`; other scaling types are refused."""
    stype = m.str("rope.scaling.type")
    if stype in (None, "none"):
        return None
    if stype != "llama3":
        raise DllamaError(f"{m.path}: rope scaling type {stype!r} is not supported (only 'llama3' is)")
    if m.float("rope.scaling.factor", 1.0) == 1.0:
        return None
    return RopeScaling(
        factor=m.float("rope.scaling.factor", 1.0),
        low_freq_factor=m.float("rope.scaling.low_freq_factor", 1.0),
        high_freq_factor=m.float("rope.scaling.high_freq_factor", 4.0),
        orig_max_seq_len=m.int("rope.scaling.original_context_length", 8192),
    )


# ---------------------------------------------------------------------------------------------------------
# The tensors most architectures share, as table rows.
# ---------------------------------------------------------------------------------------------------------


def vector(
    name: str, length: Callable[[ModelConfig], int], split: str = "replicate", **kw: Any
) -> TensorSpec:
    """A 1-D tensor (norm scales, biases), f32 in `.m` files."""
    return TensorSpec(name, lambda c: (length(c),), split, m=kw.pop("m", "f32"), **kw)


def matrix(name: str, rows: Callable, cols: Callable, split: str, **kw: Any) -> TensorSpec:
    """A rows x cols matrix (rows = output features)."""
    return TensorSpec(name, lambda c: (rows(c), cols(c)), split, **kw)


def dim(c: ModelConfig) -> int:
    return c.dim


def q_dim(c: ModelConfig) -> int:
    return c.q_dim


def kv_dim(c: ModelConfig) -> int:
    return c.kv_dim


def hidden(c: ModelConfig) -> int:
    return c.hidden_dim


def vocab(c: ModelConfig) -> int:
    return c.vocab_size


def head_dim(c: ModelConfig) -> int:
    return c.head_dim


EMBEDDING = matrix("token_embd.weight", vocab, dim, "root", m="f32")
ATTENTION = (
    matrix("blk.{l}.attn_q.weight", q_dim, dim, "q:out"),
    matrix("blk.{l}.attn_k.weight", kv_dim, dim, "kv:out"),
    matrix("blk.{l}.attn_v.weight", kv_dim, dim, "kv:out"),
    matrix("blk.{l}.attn_output.weight", dim, q_dim, "q:in"),
)
DENSE_FFN = (  # .m order: w1 (gate), w2 (down), w3 (up)
    matrix("blk.{l}.ffn_gate.weight", hidden, dim, "ffn:out"),
    matrix("blk.{l}.ffn_down.weight", dim, hidden, "ffn:in"),
    matrix("blk.{l}.ffn_up.weight", hidden, dim, "ffn:out"),
)
NORMS = (vector("blk.{l}.attn_norm.weight", dim), vector("blk.{l}.ffn_norm.weight", dim))
QK_NORMS = (vector("blk.{l}.attn_q_norm.weight", head_dim), vector("blk.{l}.attn_k_norm.weight", head_dim))
OUTPUT = (
    vector("output_norm.weight", dim),
    matrix("output.weight", vocab, dim, "vocab:out", optional=True, tied_to="token_embd.weight"),
)
