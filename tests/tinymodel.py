"""Deterministic random-weight Llama GGUF files for tests: any shape and weight type, byte-level tokenizer."""

from __future__ import annotations

import math
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter

from engine.config import RopeScaling

GGML_TYPES = {
    "f32": GGMLQuantizationType.F32,
    "f16": GGMLQuantizationType.F16,
    "bf16": GGMLQuantizationType.BF16,
    "q80": GGMLQuantizationType.Q8_0,
    "q40": GGMLQuantizationType.Q4_0,
    "q41": GGMLQuantizationType.Q4_1,
}

# Specials follow the 256 byte tokens: bos/eos first, then reserved fillers up to the requested vocab size.
SPECIALS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
BOS_ID = 256
EOS_ID = 257
EOT_ID = 258
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def gpt2_byte_chars() -> list[str]:
    """The GPT-2 byte->unicode table as a list indexed by byte value (printable bytes map to themselves)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table: dict[int, str] = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


def tiny_tokens(vocab: int) -> list[str]:
    """Token strings of the tiny tokenizer: 256 byte characters, the specials, `<|reserved_k|>` fillers."""
    base = gpt2_byte_chars() + SPECIALS
    if vocab < len(base):
        raise ValueError(f"vocab {vocab} is too small for the byte-level tokenizer (needs >= {len(base)})")
    return base + [f"<|reserved_{k}|>" for k in range(vocab - len(base))]


def llama31_rope_divisors(head_dim: int, theta: float, rs: RopeScaling) -> np.ndarray:
    """Per-frequency divisors of the Llama 3.1 rule (what llama.cpp stores as rope_freqs.weight), float64."""
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    out = np.empty_like(freqs)
    hi_w = rs.orig_max_seq_len / rs.high_freq_factor
    lo_w = rs.orig_max_seq_len / rs.low_freq_factor
    for i, f in enumerate(freqs):
        wavelen = 2 * math.pi / f
        if wavelen < hi_w:
            out[i] = 1.0
        elif wavelen > lo_w:
            out[i] = rs.factor
        else:
            span = rs.high_freq_factor - rs.low_freq_factor
            s = (rs.orig_max_seq_len / wavelen - rs.low_freq_factor) / span
            out[i] = 1.0 / ((1 - s) / rs.factor + s)
    return out


def tiny_weights(
    *,
    dim: int,
    hidden_dim: int,
    n_layers: int,
    n_heads: int,
    n_kv_heads: int,
    vocab: int,
    seed: int,
    tied: bool,
) -> dict[str, np.ndarray]:
    """The float32 tensors of the model by GGUF name, rows x cols; matrices scaled by 1/sqrt(cols)."""
    rng = np.random.default_rng(seed)
    head_dim = dim // n_heads

    def mat(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols)) / math.sqrt(cols)).astype(np.float32)

    def norm(n: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    embd = (0.5 * rng.standard_normal((vocab, dim))).astype(np.float32)
    w: dict[str, np.ndarray] = {"token_embd.weight": embd}
    for layer in range(n_layers):
        p = f"blk.{layer}."
        w[p + "attn_norm.weight"] = norm(dim)
        w[p + "attn_q.weight"] = mat(n_heads * head_dim, dim)
        w[p + "attn_k.weight"] = mat(n_kv_heads * head_dim, dim)
        w[p + "attn_v.weight"] = mat(n_kv_heads * head_dim, dim)
        w[p + "attn_output.weight"] = mat(dim, n_heads * head_dim)
        w[p + "ffn_norm.weight"] = norm(dim)
        w[p + "ffn_gate.weight"] = mat(hidden_dim, dim)
        w[p + "ffn_up.weight"] = mat(hidden_dim, dim)
        w[p + "ffn_down.weight"] = mat(dim, hidden_dim)
    w["output_norm.weight"] = norm(dim)
    if not tied:
        w["output.weight"] = mat(vocab, dim)
    return w


def write_tiny_gguf(
    path: str | Path,
    *,
    dim: int = 64,
    hidden_dim: int = 96,
    n_layers: int = 2,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    vocab: int = 288,
    wtype: str = "f32",
    seed: int = 0,
    tied: bool = False,
    context: int = 256,
    rope_theta: float = 10000.0,
    rope_scaling: RopeScaling | None = None,
    rope_store: str = "keys",
) -> Path:
    """Write a deterministic random Llama GGUF; matrices and embedding in `wtype`, norms f32.

    `rope_store` says how `rope_scaling` is recorded: "keys" (llama.rope.scaling.* metadata), "tensor" (only a
    rope_freqs.weight tensor of divisors, as llama.cpp's converter does for Llama 3.1) or "both".
    """
    if rope_store not in ("keys", "tensor", "both"):
        raise ValueError(f"rope_store {rope_store!r}: use keys, tensor or both")
    path = Path(path)
    qtype = GGML_TYPES[wtype]
    weights = tiny_weights(
        dim=dim, hidden_dim=hidden_dim, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
        vocab=vocab, seed=seed, tied=tied,
    )
    tokens = tiny_tokens(vocab)
    w = GGUFWriter(str(path), "llama")
    w.add_name("tiny-random-llama")
    w.add_context_length(context)
    w.add_embedding_length(dim)
    w.add_feed_forward_length(hidden_dim)
    w.add_block_count(n_layers)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv_heads)
    w.add_rope_dimension_count(dim // n_heads)
    w.add_rope_freq_base(rope_theta)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    if rope_scaling is not None and rope_store in ("keys", "both"):
        w.add_string("llama.rope.scaling.type", "llama3")
        w.add_float32("llama.rope.scaling.factor", rope_scaling.factor)
        w.add_float32("llama.rope.scaling.low_freq_factor", rope_scaling.low_freq_factor)
        w.add_float32("llama.rope.scaling.high_freq_factor", rope_scaling.high_freq_factor)
        w.add_uint32("llama.rope.scaling.original_context_length", rope_scaling.orig_max_seq_len)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * 256 + [3] * (vocab - 256))
    w.add_bos_token_id(BOS_ID)
    w.add_eos_token_id(EOS_ID)
    w.add_eot_token_id(EOT_ID)
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML_TEMPLATE)
    if rope_scaling is not None and rope_store in ("tensor", "both"):
        divisors = llama31_rope_divisors(dim // n_heads, rope_theta, rope_scaling).astype(np.float32)
        weights["rope_freqs.weight"] = divisors
    for name in sorted(weights):
        t = weights[name]
        if t.ndim == 1:
            w.add_tensor(name, t)
        elif qtype == GGMLQuantizationType.F32:
            w.add_tensor(name, t)
        else:
            w.add_tensor(name, gguf.quants.quantize(t, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
