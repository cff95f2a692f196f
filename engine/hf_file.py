"""Hugging Face checkpoint folders read as a Model: config.json, *.safetensors shards, tokenizer.json.

The architecture registry maps config.json's `model_type` to an engine architecture, whose tensor table names
each tensor as the checkpoint does (engine/arch/). Safetensors headers are parsed and checked against their
files here, and tensors stay memory-mapped views in their stored type (f32, f16, bf16); only a mixture of
experts' per-expert matrices are copied, into one stack per layer. q/k rows stay in HF's rotate-half order,
so the config says NeoX pairing; converters permute them into the interleaved order GGUF and `.m` files of
the llama architecture use. The tokenizer becomes GGUF tokenizer metadata (tokenizer.ggml.*), which the
engine's GGUF tokenizer, the GGUF writer and the `.t` writer all read.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine.arch import registry
from engine.arch.base import Arch, HFConfig, as_weight_shape, hf_key_names
from engine.config import MAX_VOCAB, ModelConfig
from engine.errors import DllamaError
from engine.files import open_regular, release_file_pages
from engine.tokenizer import GPT2_SPLIT, LLAMA3_SPLIT, QWEN2_SPLIT
from engine.weights import Model, Weight, map_file, weight_from_bytes

CONFIG = "config.json"
INDEX = "model.safetensors.index.json"
MAX_ST_HEADER = 100_000_000  # the safetensors library's own bound on a header
MAX_JSON = 16 << 20  # config.json, tokenizer_config.json, the shard index
MAX_TOKENIZER_JSON = 256 << 20  # real ones take 2-35 MB
ST_DTYPES = {"F32": ("f32", 4), "F16": ("f16", 2), "BF16": ("bf16", 2)}
MAX_DIMS = 4
# Tensors some checkpoints carry that no model needs: old Llama checkpoints' cached RoPE frequencies.
IGNORED = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")
# GGUF token types (SentencePiece piece types) of the tokenizer metadata.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"  # SentencePiece's visible space


def is_checkpoint(path: str | Path) -> bool:
    """A folder holding a config.json: what --model DIR names."""
    return os.path.isdir(path) and os.path.exists(os.path.join(path, CONFIG))


# ---- JSON files ------------------------------------------------------------------------------------------


def _unique_keys(where: str) -> Callable[[list[tuple[str, Any]]], dict[str, Any]]:
    def build(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise DllamaError(f"{where}: key {key!r} appears twice")
            out[key] = value
        return out

    return build


def parse_json(raw: bytes, where: str) -> Any:
    """JSON text of a file; invalid UTF-8 or JSON, duplicate keys and absurd nesting are one-line errors."""
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys(where))
    except UnicodeDecodeError:
        raise DllamaError(f"{where}: not UTF-8 text") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError, as is a 5000-digit number
        raise DllamaError(f"{where}: not valid JSON ({' '.join(str(e).split())})") from None


def read_json(path: Path, limit: int = MAX_JSON) -> dict[str, Any]:
    """A JSON object from a regular file of at most `limit` bytes."""
    with open_regular(path, "expected a JSON file") as f:
        try:
            raw = f.read(limit + 1)
        except OSError as e:
            raise DllamaError(f"{path}: cannot read ({e.strerror})") from None
    if len(raw) > limit:
        raise DllamaError(f"{path}: over {limit >> 20} MiB, too large for this file")
    value = parse_json(raw, str(path))
    if not isinstance(value, dict):
        raise DllamaError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


# ---- safetensors -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class STensor:
    """One tensor of a safetensors file: dllama type, shape (row-major, as stored) and absolute byte range."""

    file: str
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    nbytes: int


def _entry(path: str, name: str, entry: Any, data_size: int) -> tuple[str, tuple[int, ...], int, int]:
    """(dtype, shape, begin, end) of a header entry, refused unless well-formed and inside the data."""
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise DllamaError(
            f"{path}: tensor {name}: a header entry needs exactly dtype, shape and data_offsets"
        )
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in ST_DTYPES:
        raise DllamaError(f"{path}: tensor {name} has dtype {dtype!r} (supported: {', '.join(ST_DTYPES)})")
    ints = (list, tuple)
    if (
        not isinstance(shape, ints)
        or len(shape) > MAX_DIMS
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise DllamaError(f"{path}: tensor {name}: shape {shape!r} is not a list of at most 4 sizes")
    if (
        not isinstance(offsets, ints)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise DllamaError(f"{path}: tensor {name}: data_offsets {offsets!r} is not [begin, end]")
    begin, end = offsets
    need = int(np.prod(shape, dtype=object)) * ST_DTYPES[dtype][1]
    if end - begin != need:
        raise DllamaError(
            f"{path}: tensor {name}: {dtype} {list(shape)} needs {need} bytes, data_offsets span "
            f"{end - begin}"
        )
    if end > data_size:
        raise DllamaError(
            f"{path}: truncated file: tensor {name} needs {end} data bytes, the file holds {data_size}"
        )
    return ST_DTYPES[dtype][0], tuple(shape), begin, end


def read_safetensors(path: str | Path) -> dict[str, STensor]:
    """The tensors of a safetensors file, its header checked against the file: the JSON header within the
    file and its size bound, every entry well-formed, the tensors tiling the data with no gap or overlap."""
    path = str(path)
    with open_regular(path, "expected a .safetensors file") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise DllamaError(
                f"{path}: truncated safetensors file ({size} bytes; the header size alone is 8)"
            )
        (n,) = struct.unpack("<Q", head)
        if n > min(MAX_ST_HEADER, size - 8):
            raise DllamaError(
                f"{path}: corrupt safetensors file: a header of {n} bytes (at most {MAX_ST_HEADER}) in a "
                f"file of {size}"
            )
        raw = f.read(n)
    header = parse_json(raw, f"{path} (safetensors header)")
    if not isinstance(header, dict):
        raise DllamaError(f"{path}: corrupt safetensors header: not a JSON object")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict):
        raise DllamaError(f"{path}: corrupt safetensors header: __metadata__ is not an object")
    data_start, data_size = 8 + n, size - 8 - n
    tensors: dict[str, STensor] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        dtype, shape, begin, end = _entry(path, name, entry, data_size)
        tensors[name] = STensor(path, name, dtype, shape, data_start + begin, end - begin)
        spans.append((begin, end, name))
    pos = 0
    for begin, end, name in sorted(spans):
        if begin != pos:
            what = "overlaps the one before it" if begin < pos else f"leaves a gap of {begin - pos} bytes"
            raise DllamaError(f"{path}: corrupt safetensors header: tensor {name} {what}")
        pos = end
    if pos != data_size:
        raise DllamaError(f"{path}: {data_size - pos} bytes after the last tensor (a corrupt header)")
    return tensors


def _shard_name(index: Path, name: Any) -> str:
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name in (".", ".."):
        raise DllamaError(f"{index}: shard name {name!r} is not a file name inside the folder")
    return name


def read_shards(folder: Path) -> dict[str, STensor]:
    """Every tensor of the checkpoint by HF name: the shards model.safetensors.index.json lists (each must
    hold exactly the tensors it names), or without an index every *.safetensors file of the folder."""
    index = folder / INDEX
    if os.path.lexists(index):
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise DllamaError(f"{index}: weight_map is missing or empty")
        files = sorted({_shard_name(index, f) for f in weight_map.values()})
        missing = [f for f in files if not os.path.lexists(folder / f)]
        if missing:
            raise DllamaError(
                f"{folder / missing[0]}: shard missing ({len(missing)} of the {len(files)} shards {INDEX} "
                "lists are absent): download the whole checkpoint"
            )
        tensors: dict[str, STensor] = {}
        for f in files:
            held = read_safetensors(folder / f)
            listed = {n for n, where in weight_map.items() if where == f}
            if set(held) != listed:
                odd = sorted(listed - set(held)) or sorted(set(held) - listed)
                why = "does not hold" if listed - set(held) else "holds a tensor the index does not list:"
                raise DllamaError(f"{folder / f}: {why} {odd[0]} ({INDEX} and the shard disagree)")
            tensors.update(held)
        return tensors
    files = sorted(p for p in folder.glob("*.safetensors"))
    if not files:
        raise DllamaError(f"{folder}: no *.safetensors file (a Hugging Face checkpoint needs its weights)")
    tensors = {}
    for p in files:
        for name, t in read_safetensors(p).items():
            if name in tensors:
                raise DllamaError(f"{p}: tensor {name} is also in {tensors[name].file}")
            tensors[name] = t
    return tensors


# ---- config.json -----------------------------------------------------------------------------------------


def read_config(folder: Path) -> tuple[Arch, ModelConfig, HFConfig]:
    """(architecture, config, the raw config) from config.json, checked by ModelConfig.validate."""
    path = folder / CONFIG
    raw = read_json(path)
    model_type = raw.get("model_type")
    arch = next((a for a in registry().values() if model_type in a.hf_types and a.hf_config), None)
    if arch is None:
        known = ", ".join(sorted(t for a in registry().values() for t in a.hf_types))
        raise DllamaError(f"{path}: model_type {model_type!r} is not supported (supported: {known})")
    h = HFConfig(raw, str(path))
    cfg = arch.hf_config(h)
    cfg.validate(str(path), hf_key_names())
    return arch, cfg, h


# ---- tensors ---------------------------------------------------------------------------------------------


def interleave_order(rows: int, n_heads: int) -> np.ndarray:
    """The row order that turns HF's rotate-half q/k rows into interleaved pairs (spec 1.5): within each
    head, new row 2i is old row i and new row 2i+1 is old row i + head_dim/2."""
    half = rows // n_heads // 2
    i = np.arange(half)
    within = np.stack([i, i + half], axis=1).reshape(-1)
    return (np.arange(n_heads)[:, None] * 2 * half + within[None, :]).reshape(-1)


class _Maps:
    """One read-only memory map per shard, opened on first use."""

    def __init__(self) -> None:
        self.maps: dict[str, np.memmap] = {}

    def bytes_of(self, t: STensor) -> np.ndarray:
        mm = self.maps.get(t.file)
        if mm is None:
            mm = self.maps[t.file] = map_file(t.file)
        raw = mm[t.start : t.start + t.nbytes]
        itemsize = 4 if t.dtype == "f32" else 2
        return raw if raw.ctypes.data % itemsize == 0 else raw.copy()  # an odd offset: an aligned copy


def _view(maps: _Maps, name: str, t: STensor) -> Callable[[], Weight]:
    return lambda: weight_from_bytes(name, t.dtype, t.shape, maps.bytes_of(t))


def _stack(maps: _Maps, name: str, parts: list[STensor]) -> Callable[[], Weight]:
    """An expert stack copied from one tensor per expert (whose file pages are dropped once copied)."""

    def build() -> Weight:
        out = np.empty(sum(p.nbytes for p in parts), np.uint8)
        pos = 0
        for p in parts:
            raw = maps.bytes_of(p)
            out[pos : pos + p.nbytes] = raw
            release_file_pages(raw)
            pos += p.nbytes
        return weight_from_bytes(name, parts[0].dtype, (len(parts), *parts[0].shape), out)

    return build


@dataclass
class Checkpoint:
    """A checkpoint folder as read: config, tokenizer metadata and, for each engine tensor name, a function
    that builds its Weight (a view of the file, or an expert stack). `tied`: the classifier is the
    embedding (output.weight has no builder)."""

    folder: Path
    arch: Arch
    config: ModelConfig
    tied: bool
    builders: dict[str, Callable[[], Weight]]
    metadata: dict[str, Any]
    file_size: int

    def model(self) -> Model:
        """The whole model, every tensor built (views cost nothing; expert stacks are copied)."""
        weights = {name: build() for name, build in self.builders.items()}
        if self.tied:
            weights["output.weight"] = weights["token_embd.weight"]
        return Model(self.config, weights, str(self.folder), self.file_size, "hf", self.metadata)


def _plan(
    arch: Arch, cfg: ModelConfig, tied: bool, tensors: dict[str, STensor], folder: Path
) -> dict[str, tuple[list[STensor], bool]]:
    """The HF tensors behind each engine tensor and whether they stack (one per expert), checked against
    the table: present where required, the shape the config implies, one type per stack; unknown tensors
    refused."""
    plan: dict[str, tuple[list[STensor], bool]] = {}
    for name, spec in arch.table(cfg):
        if spec.hf is None or (tied and name == "output.weight"):
            continue
        layer = int(name.split(".")[1]) if spec.per_layer else 0
        shape = spec.shape(cfg)
        if "{e}" in spec.hf:
            hf_names, each = [spec.hf.format(l=layer, e=e) for e in range(shape[0])], shape[1:]
        else:
            hf_names, each = [spec.hf.format(l=layer)], shape
        found = [tensors.get(n) for n in hf_names]
        if any(t is None for t in found):
            if spec.optional and spec.tied_to is None and not any(found):  # HF ties only by config
                continue
            missing = hf_names[found.index(None)]
            hint = " (or set tie_word_embeddings)" if name == "output.weight" else ""
            raise DllamaError(f"{folder}: required tensor {missing} is missing{hint}")
        for t in found:
            if as_weight_shape(t.shape) != as_weight_shape(each):
                got, need = "x".join(map(str, t.shape)), "x".join(map(str, each))
                raise DllamaError(f"{t.file}: tensor {t.name} is {got}, config.json needs {need}")
            if t.dtype != found[0].dtype:
                raise DllamaError(f"{t.file}: tensor {t.name} is {t.dtype}, {found[0].name} {found[0].dtype}")
        plan[name] = (found, "{e}" in spec.hf)
    used = {t.name for ts, _ in plan.values() for t in ts}
    unknown = sorted(
        n
        for n in tensors
        if n not in used and not IGNORED.fullmatch(n) and not (tied and n == "lm_head.weight")
    )
    if unknown:
        raise DllamaError(
            f"{tensors[unknown[0]].file}: tensor {unknown[0]} ({len(unknown)} in all) is not part of the "
            f"{arch.name} architecture: this variant is not supported"
        )
    return plan


def read_checkpoint(folder: str | Path) -> Checkpoint:
    """Read a checkpoint folder's config, shard headers and tokenizer; nothing is mapped or built yet."""
    folder = Path(folder)
    arch, cfg, h = read_config(folder)
    tied = h.flag("tie_word_embeddings", False)
    tensors = read_shards(folder)
    maps = _Maps()
    builders = {
        name: _stack(maps, name, ts) if stacked else _view(maps, name, ts[0])
        for name, (ts, stacked) in _plan(arch, cfg, tied, tensors, folder).items()
    }
    size = sum(os.path.getsize(f) for f in {t.file for t in tensors.values()})
    meta = {"general.architecture": arch.name, "general.name": folder.resolve().name}
    meta.update(tokenizer_metadata(folder, h.config))
    return Checkpoint(folder, arch, cfg, tied, builders, meta, size)


def open_hf(folder: str | Path) -> Model:
    """A Hugging Face checkpoint folder as a Model (tensors memory-mapped in their stored types)."""
    return read_checkpoint(folder).model()


# ---- tokenizer.json + tokenizer_config.json -> GGUF tokenizer metadata -----------------------------------

# Pre-tokenizers as tokenizer.json spells them -> the GGUF tokenizer.ggml.pre llama.cpp gives them.
_SPLITS = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2", GPT2_SPLIT: "gpt-2"}


def _pre_name(pre: Any, where: str) -> str:
    """tokenizer.ggml.pre for a byte-level BPE pre-tokenizer; other pre-tokenizers are refused."""
    parts = pre.get("pretokenizers") if isinstance(pre, dict) and pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") if isinstance(p, dict) else None for p in parts or []]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if (
        kinds == ["Digits", "ByteLevel"]
        and parts[0].get("individual_digits")
        and parts[1].get("use_regex", True)
    ):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        pattern = parts[0].get("pattern")
        regex = pattern.get("Regex") if isinstance(pattern, dict) else None
        if regex in _SPLITS and parts[0].get("behavior") == "Isolated" and not parts[0].get("invert"):
            return _SPLITS[regex]
    raise DllamaError(
        f"{where}: pre-tokenizer {json.dumps(kinds)} is not supported (byte-level BPE with the GPT-2, "
        "Llama 3, Qwen2 or SmolLM2 split)"
    )


def _token_text(value: Any) -> str | None:
    """A special token of tokenizer_config.json: a string or an AddedToken object with its content."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _chat_template(folder: Path, tc: dict[str, Any]) -> str | None:
    """tokenizer_config.json's chat_template (a string, or the "default" of a list of named ones), else
    chat_template.jinja beside it."""
    t = tc.get("chat_template")
    if isinstance(t, list):
        t = next((x.get("template") for x in t if isinstance(x, dict) and x.get("name") == "default"), None)
    if isinstance(t, str):
        return t
    jinja = folder / "chat_template.jinja"
    if os.path.lexists(jinja):
        with open_regular(jinja) as f:
            return f.read(MAX_JSON).decode("utf-8", errors="replace")
    return None


def _adds_bos(tj: dict[str, Any], bos: str | None) -> bool:
    """Whether tokenizer.json's post-processor puts the BOS token before every text."""
    post = tj.get("post_processor")
    steps = (
        post.get("processors", []) if isinstance(post, dict) and post.get("type") == "Sequence" else [post]
    )
    for step in steps:
        if isinstance(step, dict) and step.get("type") == "TemplateProcessing":
            single = step.get("single") or [{}]
            first = single[0].get("SpecialToken", {}) if isinstance(single[0], dict) else {}
            return bos is not None and first.get("id") == bos
    return False


def _vocabulary(tj: dict[str, Any], where: str) -> tuple[list[str], list[int], list[str]]:
    """(tokens by id, GGUF token types, merges "a b") of a BPE tokenizer.json."""
    model = tj.get("model")
    if not isinstance(model, dict) or model.get("type") != "BPE":
        kind = model.get("type") if isinstance(model, dict) else None
        raise DllamaError(f"{where}: tokenizer model {kind!r} is not supported (BPE is)")
    vocab, added = model.get("vocab"), tj.get("added_tokens") or []
    if not isinstance(vocab, dict) or not isinstance(added, list):
        raise DllamaError(f"{where}: model.vocab is not an object or added_tokens not a list")
    by_id: dict[int, tuple[str, int]] = {}
    entries = [(t, i, NORMAL) for t, i in vocab.items()]
    for a in added:
        if not isinstance(a, dict) or not isinstance(a.get("content"), str):
            raise DllamaError(f"{where}: an added token without content")
        entries.append((a["content"], a.get("id"), CONTROL if a.get("special") else USER_DEFINED))
    for text, tid, kind in entries:
        if isinstance(tid, bool) or not isinstance(tid, int) or not 0 <= tid < MAX_VOCAB:
            raise DllamaError(f"{where}: token {text!r} has id {tid!r} (expected 0 to {MAX_VOCAB - 1})")
        old = by_id.get(tid)
        if old is not None and old[0] != text:
            raise DllamaError(f"{where}: id {tid} is both {old[0]!r} and {text!r}")
        by_id[tid] = (text, kind if old is None or kind != NORMAL else old[1])
    if not by_id:
        raise DllamaError(f"{where}: the vocabulary is empty")
    n = max(by_id) + 1
    tokens = [by_id.get(i, (f"[PAD{i}]", UNUSED))[0] for i in range(n)]
    types = [by_id.get(i, ("", UNUSED))[1] for i in range(n)]
    merges: list[str] = []
    for m in model.get("merges") or []:
        pair = m.split(" ") if isinstance(m, str) else m
        if (
            not isinstance(pair, list)
            or len(pair) != 2
            or not all(isinstance(p, str) and " " not in p for p in pair)
        ):
            raise DllamaError(f"{where}: malformed merge {m!r} (expected two tokens)")
        merges.append(" ".join(pair))
    return tokens, types, merges


def _byte_level(
    tj: dict[str, Any], tokens: list[str], types: list[int], merges: list[str], where: str
) -> dict:
    """GGUF `gpt2` metadata of a byte-level BPE (GPT-2, Llama 3, Qwen2, SmolLM2)."""
    normalizer = tj.get("normalizer")
    if normalizer is not None and (not isinstance(normalizer, dict) or normalizer.get("type") != "NFC"):
        kind = normalizer.get("type") if isinstance(normalizer, dict) else normalizer
        raise DllamaError(f"{where}: normalizer {kind!r} is not supported (byte-level BPE has none, or NFC)")
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": _pre_name(tj.get("pre_tokenizer"), where),
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": merges,
    }


def _space_prefix(tj: dict[str, Any], where: str) -> bool:
    """Whether a SentencePiece-style tokenizer.json puts a space before the text: its normalizer prepends
    one (Llama 2's [Prepend, Replace]) or its Metaspace pre-tokenizer does; other set-ups are refused."""
    norm, pre = tj.get("normalizer"), tj.get("pre_tokenizer")
    steps = (
        norm.get("normalizers", []) if isinstance(norm, dict) and norm.get("type") == "Sequence" else [norm]
    )
    kinds = [n.get("type") if isinstance(n, dict) else None for n in steps]
    if kinds == ["Prepend", "Replace"] and pre is None and steps[0].get("prepend") == SPACE:
        return True
    if kinds == ["Replace"] and pre is None:
        return False
    if norm is None and isinstance(pre, dict) and pre.get("type") == "Metaspace":
        return pre.get("prepend_scheme", "always") != "never"
    raise DllamaError(
        f"{where}: SentencePiece normalizer {json.dumps(kinds)} with this pre-tokenizer is not supported "
        "(Llama 2's [Prepend, Replace] or a Metaspace pre-tokenizer are)"
    )


def _sentencepiece(
    tj: dict[str, Any], tokens: list[str], types: list[int], merges: list[str], where: str
) -> dict:
    """GGUF `llama` metadata of a SentencePiece BPE with byte fallback (Llama 2, Mistral): `<0xNN>` pieces
    are bytes, and each merged piece scores minus the rank of the first merge that makes it, so merging by
    score (SentencePiece) follows the merge order (tokenizer.json)."""
    unk = tj["model"].get("unk_token")
    ids = {t: i for i, t in enumerate(tokens)}
    types = list(types)
    for i, t in enumerate(tokens):
        if types[i] == NORMAL and re.fullmatch(r"<0x[0-9A-F]{2}>", t):
            types[i] = BYTE
    if unk in ids:
        types[ids[unk]] = UNKNOWN
    scores = [-float(len(merges) + 1)] * len(tokens)
    for rank, m in enumerate(merges):
        tid = ids.get(m.replace(" ", ""))
        if tid is not None:
            scores[tid] = max(scores[tid], -float(rank))
    meta = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.add_space_prefix": _space_prefix(tj, where),
    }
    if unk in ids:
        meta["tokenizer.ggml.unknown_token_id"] = ids[unk]
    return meta


def tokenizer_metadata(folder: Path, config: dict[str, Any]) -> dict[str, Any]:
    """GGUF tokenizer metadata (the keys llama.cpp writes) from tokenizer.json and tokenizer_config.json
    (special token ids config.json gives where they do not); empty when the folder has no tokenizer.json."""
    path = folder / "tokenizer.json"
    if not os.path.lexists(path):
        return {}
    tj = read_json(path, MAX_TOKENIZER_JSON)
    tc_path = folder / "tokenizer_config.json"
    tc = read_json(tc_path) if os.path.lexists(tc_path) else {}
    tokens, types, merges = _vocabulary(tj, str(path))
    spm = tj["model"].get("byte_fallback") is True
    meta = (_sentencepiece if spm else _byte_level)(tj, tokens, types, merges, str(path))
    ids = {t: i for i, t in reversed(list(enumerate(tokens)))}
    for role in ("bos", "eos", "pad"):
        text = _token_text(tc.get(f"{role}_token"))
        if text is not None:
            if text not in ids:
                raise DllamaError(f"{tc_path}: {role}_token {text!r} is not in the vocabulary of {path}")
            tid = ids[text]
        else:
            tid = config.get(f"{role}_token_id")
            tid = tid[0] if isinstance(tid, list) and tid else tid
            if isinstance(tid, bool) or not isinstance(tid, int) or not 0 <= tid < len(tokens):
                continue
        meta[f"tokenizer.ggml.{'padding' if role == 'pad' else role}_token_id"] = tid
    add_bos = tc.get("add_bos_token")
    if not isinstance(add_bos, bool):
        bos_id = meta.get("tokenizer.ggml.bos_token_id")
        add_bos = _adds_bos(tj, tokens[bos_id] if bos_id is not None else None)
    meta["tokenizer.ggml.add_bos_token"] = add_bos
    template = _chat_template(folder, tc)
    if template is not None:
        meta["tokenizer.chat_template"] = template
    return meta
