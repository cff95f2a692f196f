"""Tiny random Hugging Face checkpoints for tests: config.json, safetensors shards written here from the
format's specification (no engine code), and a byte-level BPE tokenizer.json built and saved by the
`tokenizers` library.

The weights are tinymodel.tiny_weights' (so a converted `.m` can be compared with write_tiny_m's bytes), under
HF names; Llama's q/k rows are stored in HF's rotate-half order, computed here independently of the engine.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from reference import RefModel, ref_model
from tinymodel import gpt2_byte_chars, tiny_weights

from engine.config import RopeScaling

HF_TYPES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "qwen3moe": "qwen3_moe"}
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"]
MERGES = [  # byte-level BPE merges (Ġ is the space), each joining two earlier tokens
    ("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("e", "r"), ("a", "n"), ("o", "n"), ("Ġ", "a"),
    ("r", "e"), ("e", "s"), ("Ġ", "s"), ("o", "r"), ("Ġ", "c"), ("a", "t"), ("e", "n"), ("Ġ", "o"),
    ("i", "s"), ("Ġ", "w"), ("Ġ", "f"), ("l", "l"), ("Ġ", "b"), ("Ġ", "p"), ("i", "t"), ("Ġ", "m"),
    ("a", "r"), ("e", "d"), ("Ġ", "in"), ("o", "u"), ("Ġ", "d"),
]  # fmt: skip
VOCAB = 256 + len(MERGES) + len(SPECIALS)  # 288: specials last, the begin-of-text token first of them
BOS_ID, EOS_ID = 256 + len(MERGES), 257 + len(MERGES)
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)  # as Meta's Llama 3 tokenizer.json spells it
QWEN2_REGEX = LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")  # as Qwen2's tokenizer.json spells it
CHAT_TEMPLATE = (
    "{% for m in messages %}<|begin_of_text|>{{ m['role'] }}: {{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|begin_of_text|>assistant: {% endif %}"
)
ST_DTYPES = {"f32": ("F32", "<f4"), "f16": ("F16", "<f2"), "bf16": ("BF16", "<u2")}


def hf_name(name: str) -> str:
    """The HF name of a tinymodel (GGUF-named) tensor; an expert stack's has `{e}` for the expert."""
    table = {
        "token_embd.weight": "model.embed_tokens.weight",
        "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
    }
    if name in table:
        return table[name]
    _, layer, rest = name.split(".", 2)
    per_layer = {
        "attn_norm.weight": "input_layernorm.weight",
        "ffn_norm.weight": "post_attention_layernorm.weight",
        "attn_q.weight": "self_attn.q_proj.weight",
        "attn_k.weight": "self_attn.k_proj.weight",
        "attn_v.weight": "self_attn.v_proj.weight",
        "attn_output.weight": "self_attn.o_proj.weight",
        "attn_q.bias": "self_attn.q_proj.bias",
        "attn_k.bias": "self_attn.k_proj.bias",
        "attn_v.bias": "self_attn.v_proj.bias",
        "attn_q_norm.weight": "self_attn.q_norm.weight",
        "attn_k_norm.weight": "self_attn.k_norm.weight",
        "ffn_gate.weight": "mlp.gate_proj.weight",
        "ffn_up.weight": "mlp.up_proj.weight",
        "ffn_down.weight": "mlp.down_proj.weight",
        "ffn_gate_inp.weight": "mlp.gate.weight",
        "ffn_gate_exps.weight": "mlp.experts.{e}.gate_proj.weight",
        "ffn_up_exps.weight": "mlp.experts.{e}.up_proj.weight",
        "ffn_down_exps.weight": "mlp.experts.{e}.down_proj.weight",
    }
    return f"model.layers.{layer}.{per_layer[rest]}"


def to_rotate_half(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Interleaved-pair q/k rows (GGUF, .m) in HF's rotate-half order: within each head the first half holds
    the even rows, the second half the odd ones (spec 1.5, inverted)."""
    rows, cols = w.shape
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], dtype: str) -> None:
    """A safetensors file: u64 header size, the JSON header (padded with spaces to 8 bytes), the data of
    every tensor in name order; `dtype` is f32, f16 or bf16 (rounded to nearest even)."""
    st, numpy_type = ST_DTYPES[dtype]
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    blobs, pos = [], 0
    for name in sorted(tensors):
        t = np.asarray(tensors[name], dtype=np.float32)
        if dtype == "bf16":
            bits = t.view(np.uint32).astype(np.uint64)
            data = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2").tobytes()
        else:
            data = t.astype(numpy_type).tobytes()
        header[name] = {"dtype": st, "shape": list(t.shape), "data_offsets": [pos, pos + len(data)]}
        blobs.append(data)
        pos += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def stored_values(t: np.ndarray, dtype: str) -> np.ndarray:
    """float64 values a tensor has once stored as `dtype`."""
    t = np.asarray(t, dtype=np.float32)
    if dtype == "bf16":
        bits = t.view(np.uint32).astype(np.uint64)
        rounded = (((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16).astype(np.uint32)
        return rounded.view(np.float32).astype(np.float64)
    return t.astype(np.float16 if dtype == "f16" else np.float32).astype(np.float64)


def write_tokenizer(folder: Path, pre: str = "llama3", add_bos_key: bool | None = None) -> None:
    """tokenizer.json (byte-level BPE of MERGES, the SPECIALS last) saved by the tokenizers library with the
    pre-tokenizer of `pre` (gpt2, llama3, qwen2 or smollm), and tokenizer_config.json. The llama3 one puts
    BOS first through its post-processor, as Meta's does; `add_bos_key` writes add_bos_token explicitly."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, processors
    from tokenizers import pre_tokenizers as pt

    chars = gpt2_byte_chars()
    vocab = {c: i for i, c in enumerate(chars)}
    for a, b in MERGES:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=list(MERGES), ignore_merges=pre == "llama3"))
    byte_level = pt.ByteLevel(add_prefix_space=False, use_regex=pre in ("gpt2", "smollm"))
    if pre in ("llama3", "qwen2"):
        regex = LLAMA3_REGEX if pre == "llama3" else QWEN2_REGEX
        tok.pre_tokenizer = pt.Sequence([pt.Split(Regex(regex), behavior="isolated"), byte_level])
    elif pre == "smollm":
        tok.pre_tokenizer = pt.Sequence([pt.Digits(individual_digits=True), byte_level])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    if pre == "llama3":
        tok.post_processor = processors.TemplateProcessing(
            single=f"{SPECIALS[0]} $A", special_tokens=[(SPECIALS[0], BOS_ID)]
        )
    tok.save(str(folder / "tokenizer.json"))
    tc: dict[str, object] = {
        "bos_token": SPECIALS[0],
        "eos_token": {"content": SPECIALS[1], "special": True},
        "chat_template": CHAT_TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    if add_bos_key is not None:
        tc["add_bos_token"] = add_bos_key
    (folder / "tokenizer_config.json").write_text(json.dumps(tc))


@dataclass
class TinyHF:
    """A written checkpoint: its folder, config.json, the float64 values it stores by HF name and the GGUF
    names of its tensors."""

    folder: Path
    config: dict
    stored: dict[str, np.ndarray]
    names: list[str]

    def ref_model(self) -> RefModel:
        """The float64 reference on the stored (unpermuted) weights: HF's rotate-half RoPE, which is the
        reference's NeoX pairing, for every architecture."""
        c = self.config
        weights: dict[str, np.ndarray] = {}
        for name in self.names:
            hf = hf_name(name)
            if "{e}" in hf:
                weights[name] = np.stack([self.stored[hf.format(e=e)] for e in range(c["num_experts"])])
            else:
                weights[name] = self.stored[hf]
        rs = c.get("rope_scaling")
        scaling = None
        if rs is not None:
            scaling = (
                rs["factor"],
                rs["low_freq_factor"],
                rs["high_freq_factor"],
                rs["original_max_position_embeddings"],
            )
        return ref_model(
            {v: k for k, v in HF_TYPES.items()}[c["model_type"]],
            weights,
            n_heads=c["num_attention_heads"],
            n_kv_heads=c["num_key_value_heads"],
            head_dim=c["head_dim"],
            norm_eps=c["rms_norm_eps"],
            rope_theta=c["rope_theta"],
            rope_neox=True,
            rope_scaling=scaling,
            n_experts=c.get("num_experts", 0),
            n_active_experts=c.get("num_experts_per_tok", 0),
        )


def write_tiny_hf(
    folder: str | Path,
    *,
    arch: str = "llama",
    dim: int = 64,
    hidden_dim: int = 96,
    n_layers: int = 2,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    head_dim: int | None = None,
    seed: int = 0,
    tied: bool = False,
    dtype: str = "f32",
    shards: int = 1,
    context: int = 256,
    rope_theta: float = 10000.0,
    rope_scaling: RopeScaling | None = None,
    n_experts: int = 4,
    n_active_experts: int = 2,
    moe_hidden_dim: int = 64,
    pre: str = "llama3",
    tokenizer: bool = True,
) -> TinyHF:
    """Write a deterministic random checkpoint of `arch` (tinymodel.tiny_weights under HF names, Llama's q/k
    rows rotate-half) as `shards` safetensors files (an index when more than one), with config.json and,
    unless `tokenizer` is False, the tokenizer files. The vocabulary is VOCAB tokens."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    moe = arch == "qwen3moe"
    head = head_dim or dim // n_heads
    w = tiny_weights(
        dim=dim,
        hidden_dim=hidden_dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        vocab=VOCAB,
        seed=seed,
        tied=tied,
        arch=arch,
        head_dim=head,
        n_experts=n_experts if moe else 0,
        moe_hidden_dim=moe_hidden_dim,
    )
    hf: dict[str, np.ndarray] = {}
    for name, t in w.items():
        if arch == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            t = to_rotate_half(t, n_heads if "attn_q" in name else n_kv_heads)
        target = hf_name(name)
        if "{e}" in target:
            hf.update({target.format(e=e): t[e] for e in range(t.shape[0])})
        else:
            hf[target] = t
    names = sorted(hf)
    per_shard = math.ceil(len(names) / shards)
    if shards == 1:
        write_safetensors(folder / "model.safetensors", hf, dtype)
    else:
        weight_map = {}
        for k in range(shards):
            file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
            part = names[k * per_shard : (k + 1) * per_shard]
            write_safetensors(folder / file, {n: hf[n] for n in part}, dtype)
            weight_map.update({n: file for n in part})
        index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config: dict[str, object] = {
        "architectures": ["TinyForCausalLM"],
        "model_type": HF_TYPES[arch],
        "hidden_size": dim,
        "intermediate_size": hidden_dim,
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv_heads,
        "head_dim": head,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": rope_theta,
        "max_position_embeddings": context,
        "vocab_size": VOCAB,
        "tie_word_embeddings": tied,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "torch_dtype": {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}[dtype],
    }
    if rope_scaling is not None:
        config["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": rope_scaling.factor,
            "low_freq_factor": rope_scaling.low_freq_factor,
            "high_freq_factor": rope_scaling.high_freq_factor,
            "original_max_position_embeddings": rope_scaling.orig_max_seq_len,
        }
    if moe:
        config.update(
            num_experts=n_experts,
            num_experts_per_tok=n_active_experts,
            moe_intermediate_size=moe_hidden_dim,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        )
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer:
        write_tokenizer(folder, pre)
    return TinyHF(folder, config, {n: stored_values(t, dtype) for n, t in hf.items()}, list(w))


SPM_SPECIALS = ["<unk>", "<s>", "</s>"]
SPM_PIECES = ["▁", "t", "h", "e", "a", "c", "i", "s", "n", "o", "r", "l", "d", "w", ","]
SPM_MERGES = [  # joining two earlier pieces; ▁ is SentencePiece's space
    ("▁", "t"), ("h", "e"), ("▁t", "he"), ("i", "n"), ("▁", "c"), ("a", "t"), ("▁c", "at"), ("▁", "i"),
    ("▁i", "s"), ("o", "r"), ("▁", "w"), ("▁w", "or"), ("l", "d"), ("▁wor", "ld"), ("e", "r"),
]  # fmt: skip


def write_spm_tokenizer(folder: Path, metaspace: bool = False) -> int:
    """A SentencePiece-style BPE tokenizer.json (Llama 2's layout: <unk> <s> </s>, 256 <0xNN> byte pieces,
    pieces, merges; byte fallback; a normalizer that prepends and replaces spaces, or with `metaspace` the
    newer Metaspace pre-tokenizer) saved by the tokenizers library, with its tokenizer_config.json.
    Returns the vocabulary size."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors
    from tokenizers import pre_tokenizers as pt

    vocab = {t: i for i, t in enumerate(SPM_SPECIALS)}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for p in SPM_PIECES + [a + b for a, b in SPM_MERGES]:
        vocab[p] = len(vocab)
    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=SPM_MERGES, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    if metaspace:
        tok.pre_tokenizer = pt.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    else:
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    tok.decoder = decoders.Sequence(steps)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPM_SPECIALS])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(folder / "tokenizer.json"))
    tc = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True}
    (folder / "tokenizer_config.json").write_text(json.dumps(tc))
    return len(vocab)
