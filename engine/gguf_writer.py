"""Any Model written as a GGUF file that llama.cpp and this engine run on their own: the metadata keys
llama.cpp's converter writes for the architecture, the tokenizer, and every tensor in the chosen type.

The file goes through the gguf package's GGUFWriter (header, metadata, tensor infos); tensor data is then
streamed a chunk of rows at a time, so memory stays near one tensor however large the model is. Matrices
take the chosen type (K-quants and the legacy quants through engine/quants.py), vectors and the MoE router
stay F32, as llama.cpp keeps them. A Llama model whose q/k rows are in rotate-half order (a Hugging Face
checkpoint) has them written interleaved, the order GGUF files of that architecture use.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from gguf import GGML_QUANT_VERSION, GGMLQuantizationType, GGUFValueType, GGUFWriter, LlamaFileType
from gguf.gguf_writer import WriterState

from engine.arch import get_arch
from engine.atomic_file import atomic_write
from engine.config import ModelConfig, RopeScaling
from engine.errors import DllamaError
from engine.hf_file import interleave_order
from engine.quants import dequantize, quantize
from engine.weight_types import WEIGHT_TYPES, row_bytes, weight_type
from engine.weights import Model, Weight, vector_f32

GGUF_WEIGHT_TYPES = tuple(WEIGHT_TYPES)  # every type engine/quants.py encodes
FILE_TYPES = {
    "f32": LlamaFileType.ALL_F32,
    "f16": LlamaFileType.MOSTLY_F16,
    "bf16": LlamaFileType.MOSTLY_BF16,
    "q40": LlamaFileType.MOSTLY_Q4_0,
    "q41": LlamaFileType.MOSTLY_Q4_1,
    "q50": LlamaFileType.MOSTLY_Q5_0,
    "q51": LlamaFileType.MOSTLY_Q5_1,
    "q80": LlamaFileType.MOSTLY_Q8_0,
    "q4k": LlamaFileType.MOSTLY_Q4_K_S,
    "q5k": LlamaFileType.MOSTLY_Q5_K_S,
    "q6k": LlamaFileType.MOSTLY_Q6_K,
}
F32_MATRICES = ("ffn_gate_inp.weight",)  # the MoE router: llama.cpp never quantizes it
UNUSED_TOKEN = 5  # GGUF token type of the padding tokens that fill the vocabulary up to the model's rows
_CHUNK_VALUES = 1 << 22  # values re-encoded at a time


def llama31_divisors(head_dim: int, theta: float, rs: RopeScaling) -> np.ndarray:
    """Per-frequency divisors (original freq / scaled freq) of the Llama 3.1 rule, spec 4.8, float64: what
    llama.cpp stores as rope_freqs.weight."""
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / freqs
    s = (rs.orig_max_seq_len / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
    mid = 1.0 / ((1 - s) / rs.factor + s)
    out = np.where(wavelen > rs.orig_max_seq_len / rs.low_freq_factor, rs.factor, mid)
    return np.where(wavelen < rs.orig_max_seq_len / rs.high_freq_factor, 1.0, out)


def tensor_type(name: str, shape: tuple[int, ...], wtype: str) -> str:
    """The type a tensor is written in: `wtype` for matrices whose rows are whole blocks of it (else Q8_0,
    else F16, as llama.cpp falls back), F32 for vectors and the router."""
    if len(shape) == 1 or name.endswith(F32_MATRICES):
        return "f32"
    for t in (wtype, "q80", "f16"):
        if shape[-1] % weight_type(t).block_values == 0:
            return t
    return "f16"


def _config_keys(cfg: ModelConfig, rope_tensor: bool) -> dict[str, Any]:
    """The architecture's hyper-parameters under llama.cpp's key names ({arch}.*), as its converter writes
    them; Llama 3.1 scaling goes in a rope_freqs tensor where the architecture has one."""
    keys: dict[str, Any] = {
        "context_length": cfg.context_len,
        "embedding_length": cfg.dim,
        "feed_forward_length": cfg.hidden_dim,
        "block_count": cfg.n_layers,
        "attention.head_count": cfg.n_heads,
        "attention.head_count_kv": cfg.n_kv_heads,
        "rope.freq_base": float(cfg.rope_theta),
        "attention.layer_norm_rms_epsilon": float(cfg.norm_eps),
        "attention.key_length": cfg.head_dim,
        "attention.value_length": cfg.head_dim,
        "rope.dimension_count": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
    }
    if cfg.n_experts:
        keys.update(
            expert_count=cfg.n_experts,
            expert_used_count=cfg.n_active_experts,
            expert_feed_forward_length=cfg.moe_hidden_dim,
        )
    rs = cfg.rope_scaling
    if rs is not None and not rope_tensor:
        keys.update(
            {
                "rope.scaling.type": "llama3",
                "rope.scaling.factor": float(rs.factor),
                "rope.scaling.low_freq_factor": float(rs.low_freq_factor),
                "rope.scaling.high_freq_factor": float(rs.high_freq_factor),
                "rope.scaling.original_context_length": rs.orig_max_seq_len,
            }
        )
    return {f"{cfg.arch}.{k}": v for k, v in keys.items()}


def _value_type(value: Any) -> GGUFValueType:
    """GGUF type of a metadata value: unsigned 32-bit for non-negative integers (as llama.cpp's token ids)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return GGUFValueType.UINT32 if value >= 0 else GGUFValueType.INT32
    return GGUFValueType.get_type(value)


def tokenizer_keys(metadata: dict[str, Any], vocab_size: int, where: str) -> dict[str, Any]:
    """The tokenizer.* metadata of a model, its vocabulary padded with unused `[PAD{i}]` tokens up to the
    model's rows (as llama.cpp does); a model without a tokenizer cannot make a GGUF that runs alone."""
    tokens = metadata.get("tokenizer.ggml.tokens")
    if not tokens:
        raise DllamaError(f"{where} has no tokenizer (tokenizer.json): a GGUF output must carry one")
    if len(tokens) > vocab_size:
        raise DllamaError(
            f"{where}: the tokenizer has {len(tokens)} tokens, the model only {vocab_size} rows"
        )
    keys = {k: v for k, v in metadata.items() if k.startswith("tokenizer.") and v is not None}
    pad = range(len(tokens), vocab_size)
    keys["tokenizer.ggml.tokens"] = [*tokens, *(f"[PAD{i}]" for i in pad)]
    types = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    keys["tokenizer.ggml.token_type"] = [*types, *(UNUSED_TOKEN for _ in pad)]
    if metadata.get("tokenizer.ggml.scores"):
        keys["tokenizer.ggml.scores"] = [*metadata["tokenizer.ggml.scores"], *(-1000.0 for _ in pad)]
    return {k: v for k, v in keys.items() if not (isinstance(v, list) and not v)}


def _write_rows(
    f: BinaryIO, data: np.ndarray, src: str, dst: str, cols: int, order: np.ndarray | None
) -> None:
    """Rows of one matrix stored as `src`, written as `dst` a chunk at a time (in `order` if given): bytes
    copied where the types agree, else decoded and re-encoded."""
    rows = data.shape[0]
    step = max(1, _CHUNK_VALUES // cols)
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        chunk = data[start:stop] if order is None else data[order[start:stop]]
        if src == dst:
            f.write(np.ascontiguousarray(chunk).tobytes())
        else:
            f.write(quantize(dequantize(chunk, src, stop - start, cols), dst).tobytes())


def _write_weight(f: BinaryIO, w: Weight, dst: str, order: np.ndarray | None) -> None:
    if w.rows == 1 and not w.experts:
        f.write(vector_f32(w).astype("<f4").tobytes())
    elif w.experts:
        for e in range(w.experts):
            _write_rows(f, w.data[e], w.dtype, dst, w.cols, order)
    else:
        _write_rows(f, w.data, w.dtype, dst, w.cols, order)


def write_gguf(
    path: str | Path, model: Model, wtype: str, log: Callable[[str], None] | None = None, name: str = ""
) -> None:
    """Write `model` as a GGUF with matrices in `wtype` (any engine weight type) and its tokenizer;
    atomic (a failure leaves no file). `name` is general.name (default: the source's)."""
    if wtype not in GGUF_WEIGHT_TYPES:
        raise DllamaError(f"weight type {wtype!r} is not one of {', '.join(GGUF_WEIGHT_TYPES)}")
    cfg = model.config
    arch = get_arch(cfg.arch)
    table = list(arch.table(cfg))
    rope_tensor = any(n == "rope_freqs.weight" for n, _ in table)
    tokenizer = tokenizer_keys(model.metadata, cfg.vocab_size, model.path)
    extra: dict[str, np.ndarray] = {}
    if rope_tensor and cfg.rope_scaling is not None:
        extra["rope_freqs.weight"] = llama31_divisors(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    interleave = cfg.rope_neox and not arch.neox  # rotate-half q/k rows of an architecture that interleaves
    plan: list[tuple[str, str, tuple[int, ...], np.ndarray | None]] = []
    for tname, spec in table:
        shape = spec.shape(cfg)
        if tname in extra:
            plan.append((tname, "f32", shape, None))
            continue
        if (tname == "output.weight" and model.tied) or tname not in model.weights:
            continue  # a tied classifier is the embedding (llama.cpp writes no output.weight then)
        order = None
        if interleave and spec.rope_heads:
            order = interleave_order(shape[0], cfg.n_heads if spec.rope_heads == "q" else cfg.n_kv_heads)
        plan.append((tname, tensor_type(tname, shape, wtype), shape, order))
    fallbacks = sorted(
        {t for n, t, s, _ in plan if len(s) > 1 and t != wtype and not n.endswith(F32_MATRICES)}
    )
    if fallbacks and log is not None:
        log(f"warning: some matrices' rows are not whole {wtype} blocks: written as {', '.join(fallbacks)}")

    w = GGUFWriter(None, arch.name)
    w.add_name(name or str(model.metadata.get("general.name") or Path(model.path).stem))
    w.add_file_type(FILE_TYPES[wtype])
    w.add_quantization_version(GGML_QUANT_VERSION)
    for key, value in {**_config_keys(cfg, rope_tensor), **tokenizer}.items():
        vtype = _value_type(value)
        if vtype == GGUFValueType.ARRAY:
            w.add_array(key, value)
        else:
            w.add_key_value(key, value, vtype)
    for tname, dtype, shape, _ in plan:
        lead = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        nbytes = lead * row_bytes(dtype, shape[-1])
        w.add_tensor_info(
            tname, shape, np.dtype(np.float32), nbytes, GGMLQuantizationType(weight_type(dtype).ggml_id)
        )
    with atomic_write(path) as f:
        w.fout, w.state = [f], WriterState.EMPTY  # GGUFWriter writes into the atomic temp file
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for tname, dtype, _, order in plan:
            w.write_padding(f, f.tell())
            start = f.tell()
            if tname in extra:
                f.write(extra[tname].astype("<f4").tobytes())
            else:
                _write_weight(f, model.weights[tname], dtype, order)
            w.write_padding(f, f.tell() - start)
            if log is not None and tname.endswith(".ffn_norm.weight"):
                log(f"wrote layer {int(tname.split('.')[1]) + 1}/{cfg.n_layers}")
        w.fout = None  # the file is atomic_write's to close
