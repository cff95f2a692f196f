"""What an architecture description is: its tensor table, its GGUF metadata reader and its layer block.

A `TensorSpec` is one row of the table every part of the engine reads: the GGUF reader and the `.m`
reader/writer (names, shapes, stream order), slicing (how nodes share a tensor), the worker (what it
expects to receive) and the Hugging Face reader (the checkpoint's name for it). Names use GGUF spelling; `{l}`
stands for the layer index, `{e}` for the expert index in the Hugging Face names of an expert stack.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

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
    stands for that one where the file lacks it. `hf` is its name in a Hugging Face checkpoint (None: never
    there); an expert stack's name has `{e}`, one matrix per expert. `rope_heads` ("q" or "kv") marks rows
    that RoPE rotates, head by head: converting between the rotate-half and the interleaved pairing permutes
    them."""

    name: str
    shape: Callable[[ModelConfig], tuple[int, ...]]
    split: str
    optional: bool = False
    m: str | None = "wt"
    tied_to: str | None = None  # a missing optional tensor is this one (a classifier tied to the embedding)
    hf: str | None = None
    rope_heads: str | None = None

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
    global ones), the metadata reader, the layer block of the forward pass, and the Hugging Face
    `model_type`s it reads with their config.json reader."""

    name: str
    m_arch_type: int | None
    neox: bool  # q/k pairs rotated half-split (NeoX) whatever a file says; False: a `.m` rope_type decides
    tensors: tuple[TensorSpec, ...]
    config: Callable[[Meta], ModelConfig]
    layer: Callable[[Builder, int], None]
    hf_types: tuple[str, ...] = ()
    hf_config: Callable[[HFConfig], ModelConfig] | None = None

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
# Hugging Face config.json: transformers' key names, shared by every architecture here.
# ---------------------------------------------------------------------------------------------------------


class HFConfig:
    """A Hugging Face config.json, read with clear errors naming the file and the key."""

    def __init__(self, config: dict[str, Any], path: str):
        self.config, self.path = config, path

    def get(self, key: str, default: Any = None) -> Any:
        value = self.config.get(key)
        return default if value is None else value

    def int(self, key: str, default: int | None = None) -> int:
        value = self.get(key, default)
        if value is None:
            raise DllamaError(f"{self.path}: {key} is missing")
        if isinstance(value, bool) or not isinstance(value, int):
            raise DllamaError(f"{self.path}: {key} = {value!r} is not an integer")
        return value

    def float(self, key: str, default: float, within: dict[str, Any] | None = None) -> float:
        """A number of the config, or of its sub-object `within` (rope_scaling)."""
        value = (self.config if within is None else within).get(key)
        value = default if value is None else value
        if isinstance(value, bool) or not isinstance(value, int | float):
            label = key if within is None else f"rope_scaling.{key}"
            raise DllamaError(f"{self.path}: {label} = {value!r} is not a number")
        return float(value)

    def flag(self, key: str, default: bool) -> bool:
        value = self.get(key, default)
        if not isinstance(value, bool):
            raise DllamaError(f"{self.path}: {key} = {value!r} is not true or false")
        return value

    def refuse(self, key: str, why: str) -> NoReturn:
        raise DllamaError(f"{self.path}: {key} = {self.config.get(key)!r} is not supported ({why})")


def hf_standard_config(h: HFConfig, arch: str, **extra: Any) -> ModelConfig:
    """ModelConfig from the config.json keys of transformers' Llama/Qwen decoders (their defaults where a
    key is absent); `extra` sets the rest (mixture-of-experts sizes). HF stores q/k rows in rotate-half
    order, which is NeoX pairing: rope_neox is True for every checkpoint, Llama's too."""
    if h.get("hidden_act", "silu") != "silu":
        h.refuse("hidden_act", "only silu is")
    dim, n_heads = h.int("hidden_size"), h.int("num_attention_heads")
    if h.get("head_dim") is None and (n_heads <= 0 or dim % n_heads):
        raise DllamaError(f"{h.path}: hidden_size {dim} is not a multiple of num_attention_heads {n_heads}")
    return ModelConfig(
        arch=arch,
        dim=dim,
        hidden_dim=h.int("intermediate_size", 0 if extra.get("n_experts") else None),
        n_layers=h.int("num_hidden_layers"),
        n_heads=n_heads,
        n_kv_heads=h.int("num_key_value_heads", n_heads),
        head_dim=h.int("head_dim", dim // n_heads if n_heads > 0 else 0),
        vocab_size=h.int("vocab_size"),
        context_len=h.int("max_position_embeddings"),
        norm_eps=h.float("rms_norm_eps", 1e-6),
        rope_theta=h.float("rope_theta", h.float("rope_theta", 10000.0, _rope_parameters(h))),  # v4 or v5
        rope_neox=True,
        rope_scaling=hf_rope_scaling(h),
        **extra,
    )


def _rope_parameters(h: HFConfig) -> dict[str, Any]:
    """rope_scaling, or transformers 5's rope_parameters (which also holds rope_theta); {} when absent."""
    for key in ("rope_scaling", "rope_parameters"):
        value = h.get(key)
        if value is not None:
            if not isinstance(value, dict):
                h.refuse(key, "an object is expected")
            return value
    return {}


def hf_rope_scaling(h: HFConfig) -> RopeScaling | None:
    """Llama 3.1 frequency scaling from rope_scaling (rope_type llama3); other scaling types are refused."""
    rs = _rope_parameters(h)
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind == "default":
        return None
    if kind != "llama3":
        raise DllamaError(f"{h.path}: rope_scaling type {kind!r} is not supported (only 'llama3' is)")
    factor = h.float("factor", 1.0, rs)
    if factor == 1.0:
        return None
    orig = rs.get("original_max_position_embeddings", 8192)
    if isinstance(orig, bool) or not isinstance(orig, int):
        raise DllamaError(
            f"{h.path}: rope_scaling.original_max_position_embeddings {orig!r} is not an integer"
        )
    return RopeScaling(
        factor=factor,
        low_freq_factor=h.float("low_freq_factor", 1.0, rs),
        high_freq_factor=h.float("high_freq_factor", 4.0, rs),
        orig_max_seq_len=orig,
    )


def hf_key_names() -> dict[str, str]:
    """The config.json key each ModelConfig field is read from, so that ModelConfig.validate names a refused
    value as the file spells it."""
    return {
        "dim": "hidden_size",
        "hidden_dim": "intermediate_size",
        "n_layers": "num_hidden_layers",
        "n_heads": "num_attention_heads",
        "n_kv_heads": "num_key_value_heads",
        "vocab_size": "vocab_size",
        "context_len": "max_position_embeddings",
        "norm_eps": "rms_norm_eps",
        "rope_theta": "rope_theta",
        "rope_scaling.factor": "rope_scaling.factor",
        "rope_scaling.low_freq_factor": "rope_scaling.low_freq_factor",
        "rope_scaling.high_freq_factor": "rope_scaling.high_freq_factor",
        "rope_scaling.orig_max_seq_len": "rope_scaling.original_max_position_embeddings",
        "n_experts": "num_experts",
        "n_active_experts": "num_experts_per_tok",
        "moe_hidden_dim": "moe_intermediate_size",
    }


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


EMBEDDING = matrix("token_embd.weight", vocab, dim, "root", m="f32", hf="model.embed_tokens.weight")
_ATT = "model.layers.{l}.self_attn."
ATTENTION = (
    matrix("blk.{l}.attn_q.weight", q_dim, dim, "q:out", hf=_ATT + "q_proj.weight", rope_heads="q"),
    matrix("blk.{l}.attn_k.weight", kv_dim, dim, "kv:out", hf=_ATT + "k_proj.weight", rope_heads="kv"),
    matrix("blk.{l}.attn_v.weight", kv_dim, dim, "kv:out", hf=_ATT + "v_proj.weight"),
    matrix("blk.{l}.attn_output.weight", dim, q_dim, "q:in", hf=_ATT + "o_proj.weight"),
)
DENSE_FFN = (  # .m order: w1 (gate), w2 (down), w3 (up)
    matrix("blk.{l}.ffn_gate.weight", hidden, dim, "ffn:out", hf="model.layers.{l}.mlp.gate_proj.weight"),
    matrix("blk.{l}.ffn_down.weight", dim, hidden, "ffn:in", hf="model.layers.{l}.mlp.down_proj.weight"),
    matrix("blk.{l}.ffn_up.weight", hidden, dim, "ffn:out", hf="model.layers.{l}.mlp.up_proj.weight"),
)
NORMS = (
    vector("blk.{l}.attn_norm.weight", dim, hf="model.layers.{l}.input_layernorm.weight"),
    vector("blk.{l}.ffn_norm.weight", dim, hf="model.layers.{l}.post_attention_layernorm.weight"),
)
QK_NORMS = (
    vector("blk.{l}.attn_q_norm.weight", head_dim, hf=_ATT + "q_norm.weight"),
    vector("blk.{l}.attn_k_norm.weight", head_dim, hf=_ATT + "k_norm.weight"),
)
OUTPUT = (
    vector("output_norm.weight", dim, hf="model.norm.weight"),
    matrix(
        "output.weight",
        vocab,
        dim,
        "vocab:out",
        optional=True,
        tied_to="token_embd.weight",
        hf="lm_head.weight",
    ),
)
