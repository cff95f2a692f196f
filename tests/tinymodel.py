"""Deterministic random-weight models for tests: GGUF files of the llama, qwen2, qwen3 and qwen3moe
architectures in any weight types (with a byte-level tokenizer), and distributed-llama `.m` files written
independently of the engine, as its converter writes them."""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter
from reference import RefModel, ref_model

from engine.config import RopeScaling
from engine.quants import quantize
from engine.weight_types import WEIGHT_TYPES

ARCHS = ("llama", "qwen2", "qwen3", "qwen3moe")
GGML_TYPES = {t.name: GGMLQuantizationType(t.ggml_id) for t in WEIGHT_TYPES.values()}
GGUF_PY_ENCODES = (
    "bf16",
    "q40",
    "q41",
    "q50",
    "q51",
    "q80",
)  # the rest of the quantized types: engine.quants

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
    arch: str = "llama",
    head_dim: int | None = None,
    n_experts: int = 0,
    moe_hidden_dim: int = 0,
) -> dict[str, np.ndarray]:
    """The float32 tensors of the model by GGUF name, rows x cols (expert stacks: experts x rows x cols);
    matrices scaled by 1/sqrt(cols). Experts replace the dense FFN when n_experts > 0."""
    if arch not in ARCHS:
        raise ValueError(f"arch {arch!r}: use one of {', '.join(ARCHS)}")
    rng = np.random.default_rng(seed)
    head_dim = head_dim or dim // n_heads
    q_dim, kv_dim = n_heads * head_dim, n_kv_heads * head_dim

    def mat(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) / math.sqrt(shape[-1])).astype(np.float32)

    def norm(n: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    embd = (0.5 * rng.standard_normal((vocab, dim))).astype(np.float32)
    w: dict[str, np.ndarray] = {"token_embd.weight": embd}
    for layer in range(n_layers):
        p = f"blk.{layer}."
        w[p + "attn_norm.weight"] = norm(dim)
        w[p + "attn_q.weight"] = mat(q_dim, dim)
        w[p + "attn_k.weight"] = mat(kv_dim, dim)
        w[p + "attn_v.weight"] = mat(kv_dim, dim)
        w[p + "attn_output.weight"] = mat(dim, q_dim)
        w[p + "ffn_norm.weight"] = norm(dim)
        if n_experts:
            w[p + "ffn_gate_inp.weight"] = ROUTER_GAIN * mat(n_experts, dim)
            w[p + "ffn_gate_exps.weight"] = mat(n_experts, moe_hidden_dim, dim)
            w[p + "ffn_up_exps.weight"] = mat(n_experts, moe_hidden_dim, dim)
            w[p + "ffn_down_exps.weight"] = mat(n_experts, dim, moe_hidden_dim)
        else:
            w[p + "ffn_gate.weight"] = mat(hidden_dim, dim)
            w[p + "ffn_up.weight"] = mat(hidden_dim, dim)
            w[p + "ffn_down.weight"] = mat(dim, hidden_dim)
        if arch == "qwen2":
            for t, n in (("q", q_dim), ("k", kv_dim), ("v", kv_dim)):
                w[f"{p}attn_{t}.bias"] = (0.5 * rng.standard_normal(n)).astype(np.float32)
        if arch in ("qwen3", "qwen3moe"):
            w[p + "attn_q_norm.weight"] = norm(head_dim)
            w[p + "attn_k_norm.weight"] = norm(head_dim)
    w["output_norm.weight"] = norm(dim)
    if not tied:
        w["output.weight"] = mat(vocab, dim)
    return w


ROUTER_GAIN = 3.0  # router logits of a few units: top-k choices with clear margins, not near-ties


def _type_key(name: str) -> str:
    """The key `types=` overrides a tensor by: its name less "blk.N." and ".weight" ("attn_q.bias" stays)."""
    if name.startswith("blk."):
        name = name.split(".", 2)[2]
    return name.removesuffix(".weight")


def _add_gguf_tensor(w: GGUFWriter, name: str, t: np.ndarray, dtype: str) -> None:
    """Store t (float32, GGUF numpy order) as `dtype`; K-quants go through engine.quants, the rest gguf-py."""
    if dtype == "f32":
        w.add_tensor(name, t)
    elif dtype == "f16":
        w.add_tensor(name, t.astype(np.float16))
    elif dtype in GGUF_PY_ENCODES:
        w.add_tensor(name, gguf.quants.quantize(t, GGML_TYPES[dtype]), raw_dtype=GGML_TYPES[dtype])
    else:
        data = quantize(t, dtype).view(np.uint8).reshape(*t.shape[:-1], -1)
        w.add_tensor(name, data, raw_dtype=GGML_TYPES[dtype])


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
    arch: str = "llama",
    head_dim: int | None = None,
    n_experts: int = 4,
    n_active_experts: int = 2,
    moe_hidden_dim: int = 64,
    types: dict[str, str] | None = None,
) -> Path:
    """Write a deterministic random GGUF of `arch` as llama.cpp lays it out; matrices and the embedding in
    `wtype`, norms, biases and the MoE router f32.

    `types` overrides the type of tensors by their name without "blk.N." and ".weight" (e.g. {"ffn_down":
    "q6k", "attn_v": "q80", "token_embd": "q50", "output": "q80"}), to mimic mixes such as Q4_K_M.
    `head_dim` (default dim / n_heads) is stored as attention.key_length/value_length where it is not the
    default, and always for qwen3/qwen3moe; n_experts, n_active_experts and moe_hidden_dim apply to qwen3moe.
    `rope_store` says how `rope_scaling` is recorded: "keys" ({arch}.rope.scaling.* metadata), "tensor" (only
    a rope_freqs.weight tensor of divisors, as llama.cpp's converter does for Llama 3.1) or "both".
    """
    if rope_store not in ("keys", "tensor", "both"):
        raise ValueError(f"rope_store {rope_store!r}: use keys, tensor or both")
    path = Path(path)
    moe = arch == "qwen3moe"
    head = head_dim or dim // n_heads
    weights = tiny_weights(
        dim=dim,
        hidden_dim=hidden_dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        vocab=vocab,
        seed=seed,
        tied=tied,
        arch=arch,
        head_dim=head,
        n_experts=n_experts if moe else 0,
        moe_hidden_dim=moe_hidden_dim,
    )
    if rope_scaling is not None and rope_store in ("tensor", "both"):
        weights["rope_freqs.weight"] = llama31_rope_divisors(head, rope_theta, rope_scaling).astype(
            np.float32
        )
    dtypes = {name: wtype if t.ndim > 1 else "f32" for name, t in weights.items()}
    for name in dtypes:
        if _type_key(name) == "ffn_gate_inp":
            dtypes[name] = "f32"  # llama.cpp never quantizes the router
    overrides = dict(types or {})
    for name in dtypes:
        dtypes[name] = overrides.get(_type_key(name), dtypes[name])
    unknown = set(overrides) - {_type_key(name) for name in dtypes}
    if unknown:
        raise ValueError(f"types: no tensors called {sorted(unknown)} in a {arch} model")
    tokens = tiny_tokens(vocab)
    w = GGUFWriter(str(path), arch)
    w.add_name(f"tiny-random-{arch}")
    w.add_context_length(context)
    w.add_embedding_length(dim)
    w.add_feed_forward_length(hidden_dim)
    w.add_block_count(n_layers)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv_heads)
    if arch == "llama":
        w.add_rope_dimension_count(head)
    if head != dim // n_heads or arch in ("qwen3", "qwen3moe"):
        w.add_key_length(head)
        w.add_value_length(head)
    w.add_rope_freq_base(rope_theta)
    w.add_layer_norm_rms_eps(1e-5)
    if moe:
        w.add_expert_count(n_experts)
        w.add_expert_used_count(n_active_experts)
        w.add_expert_feed_forward_length(moe_hidden_dim)
    w.add_vocab_size(vocab)
    if rope_scaling is not None and rope_store in ("keys", "both"):
        w.add_string(f"{arch}.rope.scaling.type", "llama3")
        w.add_float32(f"{arch}.rope.scaling.factor", rope_scaling.factor)
        w.add_float32(f"{arch}.rope.scaling.low_freq_factor", rope_scaling.low_freq_factor)
        w.add_float32(f"{arch}.rope.scaling.high_freq_factor", rope_scaling.high_freq_factor)
        w.add_uint32(f"{arch}.rope.scaling.original_context_length", rope_scaling.orig_max_seq_len)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * 256 + [3] * (vocab - 256))
    w.add_bos_token_id(BOS_ID)
    w.add_eos_token_id(EOS_ID)
    w.add_eot_token_id(EOT_ID)
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML_TEMPLATE)
    for name in sorted(weights):
        _add_gguf_tensor(w, name, weights[name], dtypes[name])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ----------------------------------------------------------------------------------------------------------
# distributed-llama .m files (spec 1.1-1.5), written without engine code

M_MAGIC = 0x0A00ABCD
M_ARCH = {"llama": 0xABCD00, "qwen3": 0xABCD01, "qwen3moe": 0xABCD02}
M_FLOAT = {"f32": 0, "f16": 1, "q40": 2, "q80": 3}
M_KEY_NAMES = (  # header key ids are the positions in this list (spec 1.2)
    "version", "arch_type", "dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "n_experts",
    "n_active_experts", "vocab_size", "max_seq_len", "hidden_act", "rope_theta", "weights_float_type",
    "rope_scaling_factor", "rope_scaling_low_freq_factor", "rope_scaling_high_freq_factory",
    "rope_scaling_orig_max_seq_len", "rope_type", "head_dim", "norm_epsilon", "moe_hidden_dim",
)  # fmt: skip
M_KEYS = {name: i for i, name in enumerate(M_KEY_NAMES)}
M_EPS = {1e-5: 5, 1e-6: 6}


@dataclass
class TinyM:
    """A written `.m` file: its header pairs in file order and the float64 values it stores by GGUF name."""

    path: Path
    header: dict[str, int]
    weights: dict[str, np.ndarray]  # expert stacks as ffn_{gate,up,down}_exps [experts, rows, cols]

    def ref_model(self) -> RefModel:
        """The float64 reference of the model as distributed-llama reads this header (integer rope_theta,
        eps code, NeoX RoPE for the Qwen3 archs, Llama 3.1 scaling when the factor is not 1)."""
        h = self.header
        arch = next(name for name, code in M_ARCH.items() if code == h["arch_type"])
        scaling = None
        if h.get("rope_scaling_factor", 1) != 1:
            scaling = (
                float(h["rope_scaling_factor"]),
                float(h["rope_scaling_low_freq_factor"]),
                float(h["rope_scaling_high_freq_factory"]),
                h["rope_scaling_orig_max_seq_len"],
            )
        return ref_model(
            arch,
            self.weights,
            n_heads=h["n_heads"],
            n_kv_heads=h["n_kv_heads"],
            head_dim=h.get("head_dim"),
            norm_eps={5: 1e-5, 6: 1e-6}[h["norm_epsilon"]],
            rope_theta=float(h["rope_theta"]),
            rope_neox=arch != "llama",
            rope_scaling=scaling,
            n_experts=h["n_experts"],
            n_active_experts=h["n_active_experts"],
        )


def _m_encode(t: np.ndarray, dtype: str) -> tuple[bytes, np.ndarray]:
    """The bytes of t (flattened row-major) as a .m float type, and the float64 values they decode to.

    Q40 is GGML Q4_0 byte for byte (spec 2.1); Q80 is GGML Q8_0 except that an exact .5 tie rounds away from
    zero here and to even in distributed-llama's converter, which random data never hits."""
    if dtype == "f32":
        return t.astype("<f4").tobytes(), t.astype(np.float64)
    if dtype == "f16":
        half = t.astype("<f2")
        return half.tobytes(), half.astype(np.float64)
    qt = {"q40": GGMLQuantizationType.Q4_0, "q80": GGMLQuantizationType.Q8_0}[dtype]
    blocks = gguf.quants.quantize(t, qt)
    return blocks.tobytes(), gguf.quants.dequantize(blocks, qt).astype(np.float64).reshape(t.shape)


def write_tiny_m(
    path: str | Path,
    *,
    arch: str = "llama",
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
    rope_theta: int = 10000,
    rope_scaling: RopeScaling | None = None,
    head_dim: int | None = None,
    norm_eps: float = 1e-5,
    n_experts: int = 4,
    n_active_experts: int = 2,
    moe_hidden_dim: int = 64,
) -> TinyM:
    """Write a deterministic random `.m` model of `arch` (llama, qwen3, qwen3moe) with `wtype` (f32, f16, q40,
    q80) matrices, as distributed-llama's convert-hf.py does: header pairs in its order, embedding and norms
    (and the router) f32, a classifier always present (the embedding in `wtype` when tied).

    The weights are those of write_tiny_gguf with the same arguments (Llama's GGUF q/k rows are already in the
    interleaved order the .m converter permutes HF's into); n_experts etc. apply to qwen3moe.
    """
    if arch not in M_ARCH:
        raise ValueError(f"arch {arch!r}: .m files hold {', '.join(M_ARCH)}")
    if wtype not in M_FLOAT:
        raise ValueError(f"wtype {wtype!r}: .m weights are {', '.join(M_FLOAT)}")
    moe = arch == "qwen3moe"
    src = tiny_weights(
        dim=dim,
        hidden_dim=hidden_dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        vocab=vocab,
        seed=seed,
        tied=tied,
        arch=arch,
        head_dim=head_dim,
        n_experts=n_experts if moe else 0,
        moe_hidden_dim=moe_hidden_dim,
    )
    header = {
        "version": 0,
        "arch_type": M_ARCH[arch],
        "hidden_act": 1,
        "dim": dim,
        "hidden_dim": hidden_dim,
        "n_layers": n_layers,
        "n_heads": n_heads,
        "n_kv_heads": n_kv_heads,
        "weights_float_type": M_FLOAT[wtype],
        "max_seq_len": context,
        "vocab_size": vocab,
        "n_experts": n_experts if moe else 0,
        "n_active_experts": n_active_experts if moe else 0,
        "rope_theta": int(rope_theta),
    }
    if rope_scaling is not None:
        header["rope_scaling_factor"] = int(rope_scaling.factor)
        header["rope_scaling_low_freq_factor"] = int(rope_scaling.low_freq_factor)
        header["rope_scaling_high_freq_factory"] = int(rope_scaling.high_freq_factor)
        header["rope_scaling_orig_max_seq_len"] = int(rope_scaling.orig_max_seq_len)
        header["rope_type"] = 2
    if head_dim is not None or arch != "llama":
        header["head_dim"] = head_dim or dim // n_heads
    header["norm_epsilon"] = M_EPS[norm_eps]
    if moe:
        header["moe_hidden_dim"] = moe_hidden_dim

    stream: list[tuple[str, np.ndarray, str]] = [("token_embd.weight", src["token_embd.weight"], "f32")]
    for layer in range(n_layers):
        p = f"blk.{layer}."
        stream += [
            (p + f"attn_{t}.weight", src[p + f"attn_{t}.weight"], wtype) for t in ("q", "k", "v", "output")
        ]
        if moe:
            stream.append((p + "ffn_gate_inp.weight", src[p + "ffn_gate_inp.weight"], "f32"))
            for e in range(n_experts):
                for t in ("gate", "down", "up"):
                    stream.append((f"{p}ffn_{t}_exps.weight#{e}", src[f"{p}ffn_{t}_exps.weight"][e], wtype))
        else:
            stream += [
                (p + f"ffn_{t}.weight", src[p + f"ffn_{t}.weight"], wtype) for t in ("gate", "down", "up")
            ]
        if arch != "llama":
            stream += [
                (p + f"attn_{t}_norm.weight", src[p + f"attn_{t}_norm.weight"], "f32") for t in ("q", "k")
            ]
        stream += [(p + f"{t}_norm.weight", src[p + f"{t}_norm.weight"], "f32") for t in ("attn", "ffn")]
    classifier = src["token_embd.weight"] if tied else src["output.weight"]
    stream += [("output_norm.weight", src["output_norm.weight"], "f32"), ("output.weight", classifier, wtype)]

    path = Path(path)
    stored: dict[str, np.ndarray] = {}
    experts: dict[str, list[np.ndarray]] = {}
    with open(path, "wb") as f:
        pairs = b"".join(struct.pack("<ii", M_KEYS[key], value) for key, value in header.items())
        f.write(struct.pack("<ii", M_MAGIC, 8 + len(pairs)) + pairs)
        for name, t, dtype in stream:
            data, values = _m_encode(t, dtype)
            f.write(data)
            if "#" in name:
                experts.setdefault(name.split("#")[0], []).append(values)
            else:
                stored[name] = values
    stored.update({name: np.stack(vs) for name, vs in experts.items()})
    return TinyM(path, header, stored)
