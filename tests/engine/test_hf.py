"""Hugging Face checkpoints: read directly (--model DIR) and converted to GGUF and to `.m` + `.t`, each
matching the float64 reference run on the checkpoint's own (rotate-half) weights; the `.m` byte for byte what
distributed-llama's converter writes (tinymodel.write_tiny_m); the tokenizer encoding as the `tokenizers`
library does; bad checkpoints refused with one line; conversion memory bounded by a tensor, not the model."""

from __future__ import annotations

import json
import os
import resource
import struct
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from forward_checks import TOKENS, assert_matches
from hfmodel import (
    BOS_ID,
    CHAT_TEMPLATE,
    EOS_ID,
    MERGES,
    SPECIALS,
    VOCAB,
    write_spm_tokenizer,
    write_tiny_hf,
    write_tokenizer,
)
from reference import load_ref_model, ref_forward
from tinymodel import gpt2_byte_chars, write_tiny_m

from cpu_fallback.backend import CpuBackend
from engine.config import RopeScaling
from engine.convert import convert
from engine.errors import DllamaError
from engine.hf_file import read_safetensors, tokenizer_metadata
from engine.model_file import open_model
from engine.runner import Runner
from engine.tfile import read_tfile
from engine.tokenizer import tokenizer_from_gguf

ROOT = Path(__file__).resolve().parents[2]
MEMORY_CAP = 3 << 30  # bytes of address space per CLI process
TIMEOUT_S = 60
RS = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, orig_max_seq_len=32)
CASES = {  # name: write_tiny_hf arguments
    "llama": dict(arch="llama"),
    "llama-tied-bf16-sharded": dict(arch="llama", tied=True, dtype="bf16", shards=3),
    "llama-rope-scaling": dict(arch="llama", rope_scaling=RS, rope_theta=500000.0),
    "qwen2-biases-f16": dict(arch="qwen2", hidden_dim=512, dtype="f16", pre="qwen2"),
    "qwen3": dict(arch="qwen3", hidden_dim=512, head_dim=32, pre="qwen2"),
    "qwen3moe-sharded": dict(arch="qwen3moe", head_dim=32, shards=2, pre="qwen2"),
}


@pytest.fixture(scope="module")
def backend() -> CpuBackend:
    return CpuBackend(1)


def logits(model, backend: CpuBackend, tokens: list[int]) -> np.ndarray:
    return Runner(model, backend, "f32", max_seq_len=64, max_batch=4).forward(tokens, 0, "all")


@pytest.mark.parametrize("case", CASES)
def test_direct_gguf_and_m_match_the_reference(tmp_path: Path, backend: CpuBackend, case: str) -> None:
    """The folder itself, its f32 GGUF and its f32 .m give the reference's logits (past the original
    context where RoPE is scaled); gguf's own reader reproduces them from the GGUF too."""
    hf = write_tiny_hf(tmp_path / "hf", seed=3, **CASES[case])
    tokens = TOKENS * 3 if "rope" in case else TOKENS
    expected = ref_forward(hf.ref_model(), tokens)
    direct = open_model(hf.folder)
    assert direct.kind == "hf" and direct.config.rope_neox  # HF's rotate-half rows, run as they are
    assert_matches(logits(direct, backend, tokens), expected)
    convert(hf.folder, tmp_path / "m.gguf", "f32", log=lambda s: None)
    assert_matches(logits(open_model(tmp_path / "m.gguf"), backend, tokens), expected)
    assert_matches(ref_forward(load_ref_model(tmp_path / "m.gguf"), tokens), expected)
    if case.startswith("qwen2"):
        with pytest.raises(DllamaError, match="has no qwen2 architecture"):
            convert(hf.folder, tmp_path / "m.m", "f32", log=lambda s: None)
        return
    convert(hf.folder, tmp_path / "m.m", "f32", tmp_path / "m.t", log=lambda s: None)
    m = open_model(tmp_path / "m.m")
    assert m.config.rope_neox == (m.config.arch != "llama")  # the .m holds interleaved Llama rows
    assert_matches(logits(m, backend, tokens), expected)


@pytest.mark.parametrize("wtype", ["f32", "q40", "q80"])
@pytest.mark.parametrize(
    "case",
    [
        dict(arch="llama"),
        dict(arch="llama", tied=True, rope_scaling=RS, rope_theta=500000),
        dict(arch="qwen3", head_dim=32, hidden_dim=512),
        dict(arch="qwen3moe", head_dim=32),
    ],
    ids=["llama", "llama-tied-rope", "qwen3", "qwen3moe"],
)
def test_m_is_byte_for_byte_what_the_spec_describes(tmp_path: Path, case: dict, wtype: str) -> None:
    """tinymodel.write_tiny_m writes the same weights as distributed-llama's converter lays them out (header
    pairs and order, tensor order, Llama's q/k rows permuted into interleaved pairs): the same bytes."""
    hf = write_tiny_hf(tmp_path / "hf", seed=4, shards=2, **case)
    convert(hf.folder, tmp_path / "got.m", wtype, log=lambda s: None)
    shape = {k: v for k, v in case.items() if k != "head_dim"}
    want = write_tiny_m(
        tmp_path / "want.m", seed=4, wtype=wtype, vocab=VOCAB, head_dim=case.get("head_dim", 16), **shape
    )
    assert (tmp_path / "got.m").read_bytes() == want.path.read_bytes()


def test_t_file_holds_the_tokenizer_json_vocabulary(tmp_path: Path) -> None:
    """The .t: raw bytes of every token (GPT-2's byte table undone), BOS/EOS from tokenizer_config.json, the
    chat template, add_bos from the Llama 3 post-processor; the specials already last keep their ids."""
    hf = write_tiny_hf(tmp_path / "hf", seed=1)
    convert(hf.folder, tmp_path / "m.m", "q80", tmp_path / "m.t", log=lambda s: None)
    tf = read_tfile(tmp_path / "m.t")
    chars = gpt2_byte_chars()
    raw = {c: bytes([b]) for b, c in enumerate(chars)}
    expected = [raw[c] for c in chars]
    expected += [b"".join(raw[c] for c in a + b) for a, b in MERGES] + [s.encode() for s in SPECIALS]
    assert tf.vocab == expected
    assert (tf.bos_id, tf.eos_ids[0], tf.add_bos, tf.chat_template) == (BOS_ID, EOS_ID, True, CHAT_TEMPLATE)


def test_gguf_metadata_as_llama_cpp_writes_it(tmp_path: Path) -> None:
    """Read back with the gguf package: llama.cpp's hyper-parameter keys, the tokenizer (merges, types,
    special ids, template), Llama 3.1 scaling as a rope_freqs tensor, no classifier when tied, the router
    and vectors F32 and the matrices in the chosen type."""
    hf = write_tiny_hf(tmp_path / "hf", tied=True, rope_scaling=RS, rope_theta=500000.0, seed=2)
    convert(hf.folder, tmp_path / "m.gguf", "q80", log=lambda s: None)
    r = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    f = {k: v.contents() for k, v in r.fields.items()}
    want = {
        "general.architecture": "llama",
        "general.file_type": 7,
        "llama.context_length": 256,
        "llama.embedding_length": 64,
        "llama.feed_forward_length": 96,
        "llama.block_count": 2,
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2,
        "llama.rope.freq_base": 500000.0,
        "llama.rope.dimension_count": 16,
        "llama.vocab_size": VOCAB,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "llama-bpe",
        "tokenizer.ggml.bos_token_id": BOS_ID,
        "tokenizer.ggml.eos_token_id": EOS_ID,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.chat_template": CHAT_TEMPLATE,
    }
    assert {k: f.get(k) for k in want} == want
    assert abs(f["llama.attention.layer_norm_rms_epsilon"] - 1e-5) < 1e-12
    assert f["tokenizer.ggml.tokens"] == gpt2_byte_chars() + [a + b for a, b in MERGES] + SPECIALS
    assert f["tokenizer.ggml.merges"] == [f"{a} {b}" for a, b in MERGES]
    assert f["tokenizer.ggml.token_type"] == [1] * (VOCAB - 3) + [3] * 3
    assert not any(k.startswith("llama.rope.scaling") for k in f)
    tensors = {t.name: t for t in r.tensors}
    assert "output.weight" not in tensors and tensors["token_embd.weight"].tensor_type.name == "Q8_0"
    assert tensors["blk.1.attn_norm.weight"].tensor_type.name == "F32"
    freqs = tensors["rope_freqs.weight"].data
    assert freqs[0] == 1.0 and freqs[-1] == 8.0  # high frequencies unscaled, the lowest divided by 8


def test_gguf_quantized_matrices_are_gguf_blocks_of_the_weights(tmp_path: Path, backend: CpuBackend) -> None:
    """Q8_0/Q4_0 matrices are the blocks gguf's own quantizer makes of the weights; a K-quant GGUF of whole
    256-value rows decodes (by gguf's decoder) within a step of them and runs as the reference runs it."""
    hf = write_tiny_hf(tmp_path / "hf", arch="qwen3moe", head_dim=32, seed=5, pre="qwen2")
    for wtype, qt in (("q80", gguf.GGMLQuantizationType.Q8_0), ("q40", gguf.GGMLQuantizationType.Q4_0)):
        convert(hf.folder, tmp_path / f"{wtype}.gguf", wtype, log=lambda s: None)
        t = {t.name: t for t in gguf.GGUFReader(str(tmp_path / f"{wtype}.gguf")).tensors}
        down = hf.stored["model.layers.1.mlp.experts.3.down_proj.weight"].astype(np.float32)
        assert t["blk.1.ffn_down_exps.weight"].data[3].tobytes() == gguf.quants.quantize(down, qt).tobytes()
        assert t["blk.0.ffn_gate_inp.weight"].tensor_type.name == "F32"
    big = write_tiny_hf(tmp_path / "big", arch="qwen3", dim=256, hidden_dim=512, head_dim=64, seed=6)
    convert(big.folder, tmp_path / "k.gguf", "q4k", log=lambda s: None)
    t = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "k.gguf")).tensors}
    gate = t["blk.0.ffn_gate.weight"]
    assert gate.tensor_type.name == "Q4_K"
    err = (
        gguf.quants.dequantize(gate.data, gate.tensor_type)
        - big.stored["model.layers.0.mlp.gate_proj.weight"]
    )
    blocks = big.stored["model.layers.0.mlp.gate_proj.weight"].reshape(-1, 32)
    # one 4-bit step of each 32-value sub-block's range (Q4_K's grid always holds 0), and half a step more
    # for the 6-bit sub-block scales
    step = (np.maximum(blocks.max(axis=1), 0) - np.minimum(blocks.min(axis=1), 0)) / 15
    assert (np.abs(err.reshape(-1, 32)) <= 1.5 * step[:, None]).all()
    got = logits(open_model(tmp_path / "k.gguf"), backend, TOKENS)
    assert_matches(got, ref_forward(load_ref_model(tmp_path / "k.gguf"), TOKENS))  # gguf's own decoding


def test_direct_weights_are_memory_mapped_bf16(tmp_path: Path) -> None:
    """Reading a folder copies nothing but expert stacks: a bf16 matrix is a view of its file's mapping."""
    hf = write_tiny_hf(tmp_path / "hf", dtype="bf16", seed=1)
    w = open_model(hf.folder).weights["blk.0.ffn_down.weight"]
    assert w.dtype == "bf16" and not w.data.flags.owndata
    base = w.data
    while base.base is not None and not isinstance(base, np.memmap):
        base = base.base
    assert isinstance(base, np.memmap)
    bits = w.data.astype(np.uint32) << 16
    assert np.array_equal(bits.view(np.float32), hf.stored["model.layers.0.mlp.down_proj.weight"])


@pytest.mark.parametrize("pre", ["gpt2", "llama3", "qwen2", "smollm"])
def test_tokenizer_encodes_as_the_tokenizers_library(tmp_path: Path, pre: str) -> None:
    """The engine's tokenizer of a folder splits and merges like `tokenizers` itself on tokenizer.json."""
    from tokenizers import Tokenizer

    write_tokenizer(tmp_path, pre)
    ours = tokenizer_from_gguf(tokenizer_metadata(tmp_path, {}))
    theirs = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    texts = [
        "the cat is in the hat",
        "Hello, world! 12345 numbers 3.14",
        "  spaces\n\nnewlines\tand tabs",
        "héllo wörld 日本語 🙂",
        f"{SPECIALS[0]}the end{SPECIALS[2]} more",
        "it's we'll they're DON'T",
    ]
    for text in texts:
        assert ours.encode(text, bos=False) == theirs.encode(text, add_special_tokens=False).ids, text
        assert ours.decode(ours.encode(text, bos=False)) == text
    assert ours.add_bos == (pre == "llama3") and ours.bos_id == BOS_ID and ours.eos_ids[0] == EOS_ID


@pytest.mark.parametrize("metaspace", [False, True], ids=["prepend-normalizer", "metaspace"])
def test_sentencepiece_tokenizer_json_encodes_as_the_tokenizers_library(
    tmp_path: Path, metaspace: bool
) -> None:
    """A Llama 2 / Mistral style tokenizer.json (byte fallback, ▁ spaces) becomes a GGUF `llama` vocabulary
    whose scores follow the merge order: the same ids as `tokenizers`, bytes outside it through <0xNN>. The
    Metaspace variant (prepend_scheme "first") agrees where SentencePiece's dummy prefix does: text that
    starts with no space and no special token."""
    from tokenizers import Tokenizer

    n = write_spm_tokenizer(tmp_path, metaspace)
    meta = tokenizer_metadata(tmp_path, {})
    assert meta["tokenizer.ggml.model"] == "llama" and len(meta["tokenizer.ggml.tokens"]) == n
    ours = tokenizer_from_gguf(meta)
    theirs = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    texts = ["the cat is in the world", "Hello, world! the cat", "héllo 日本 🙂", "theworld cat,is"]
    if not metaspace:
        texts += ["  two  spaces and\nnewline", "<s>the</s> cat"]
    for text in texts:
        assert ours.encode(text, bos=False) == theirs.encode(text, add_special_tokens=False).ids, text
    assert ours.decode(ours.encode(texts[2], bos=False)) == texts[2]
    assert (ours.add_bos, ours.bos_id, ours.eos_ids[0]) == (True, 1, 2)


def test_add_bos_token_in_tokenizer_config_wins(tmp_path: Path) -> None:
    write_tokenizer(tmp_path, "qwen2", add_bos_key=True)
    assert tokenizer_metadata(tmp_path, {})["tokenizer.ggml.add_bos_token"] is True


# ---- the command line ----------------------------------------------------------------------------------


def _cap_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))


def dllama(*args: str) -> subprocess.CompletedProcess:
    """The CLI, bounded in time and address space."""
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
        preexec_fn=_cap_memory,
    )


def _generated(tmp_path: Path, model: Path, name: str) -> list[int]:
    out = tmp_path / f"{name}.json"
    r = dllama("--backend", "cpu", "inference", "--model", str(model), "--prompt", "the cat", "--steps", "6",
               "--temperature", "0", "--ignore-eos", "--json", str(out))  # fmt: skip
    assert r.returncode == 0, r.stderr
    return json.loads(out.read_text())["generated_ids"]


def test_cli_runs_a_folder_and_converts_it(tmp_path: Path) -> None:
    """`--model DIR` generates the same greedy tokens as the f32 GGUF `convert --hf DIR` writes."""
    hf = write_tiny_hf(tmp_path / "hf", seed=7)
    r = dllama(
        "convert", "--hf", str(hf.folder), "--output", str(tmp_path / "m.gguf"), "--weights-float-type", "f32"
    )
    assert r.returncode == 0 and "wrote" in r.stdout, r.stderr
    direct = _generated(tmp_path, hf.folder, "direct")
    assert len(direct) == 6 and direct == _generated(tmp_path, tmp_path / "m.gguf", "gguf")


# ---- bad checkpoints -------------------------------------------------------------------------------------


def _header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack_from("<Q", raw)
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _rewrite(path: Path, header: dict | bytes, data: bytes) -> None:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def _edit_header(edit):
    def apply(folder: Path) -> None:
        path = folder / "model.safetensors"
        header, data = _header(path)
        edit(header)
        _rewrite(path, header, data)

    return apply


def _edit_config(**changes):
    def apply(folder: Path) -> None:
        cfg = json.loads((folder / "config.json").read_text())
        cfg.update(changes)
        (folder / "config.json").write_text(json.dumps(cfg))

    return apply


def _truncate(folder: Path) -> None:
    path = folder / "model.safetensors"
    os.truncate(path, path.stat().st_size // 2)


def _header_size_lies(folder: Path) -> None:
    path = folder / "model.safetensors"
    raw = bytearray(path.read_bytes())
    raw[:8] = struct.pack("<Q", len(raw))
    path.write_bytes(bytes(raw))


def _not_json(folder: Path) -> None:
    path = folder / "model.safetensors"
    header, data = _header(path)
    text = json.dumps(header).encode()
    _rewrite(path, b"\xff" + text[1:], data)


def _duplicate_key(folder: Path) -> None:
    path = folder / "model.safetensors"
    header, data = _header(path)
    text = json.dumps(header)
    first = next(k for k in header if k != "__metadata__")
    _rewrite(path, ("{" + f'"{first}": {json.dumps(header[first])}, ' + text[1:]).encode(), data)


def _overlap(header: dict) -> None:
    entries = sorted((v["data_offsets"], k) for k, v in header.items() if k != "__metadata__")
    (b0, e0), _ = entries[0]
    name = entries[1][1]
    size = header[name]["data_offsets"][1] - header[name]["data_offsets"][0]
    header[name]["data_offsets"] = [b0, b0 + size]


def _drop_shard(folder: Path) -> None:
    (folder / "model-00002-of-00003.safetensors").unlink()


def _index_edit(edit):
    def apply(folder: Path) -> None:
        path = folder / "model.safetensors.index.json"
        index = json.loads(path.read_text())
        edit(index["weight_map"])
        path.write_text(json.dumps(index))

    return apply


def _drop_first(weight_map: dict) -> None:
    del weight_map[sorted(weight_map)[0]]


def _escape(weight_map: dict) -> None:
    weight_map[sorted(weight_map)[0]] = "../model-00001-of-00003.safetensors"


def _add_tensor(name: str, dtype: str = "F32", shape: tuple[int, ...] = (64,)):
    def apply(folder: Path) -> None:
        path = folder / "model.safetensors"
        header, data = _header(path)
        size = int(np.prod(shape)) * {"F32": 4, "I64": 8}[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [len(data), len(data) + size]}
        _rewrite(path, header, data + bytes(size))

    return apply


def _drop_tensor(name: str):
    def apply(folder: Path) -> None:
        path = folder / "model.safetensors"
        header, data = _header(path)
        begin, end = header.pop(name)["data_offsets"]
        for v in header.values():
            if "data_offsets" in v and v["data_offsets"][0] >= end:
                v["data_offsets"] = [o - (end - begin) for o in v["data_offsets"]]
        _rewrite(path, header, data[:begin] + data[end:])

    return apply


def _pre_tokenizer(folder: Path) -> None:
    tj = json.loads((folder / "tokenizer.json").read_text())
    tj["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always"}
    (folder / "tokenizer.json").write_text(json.dumps(tj))


def _bos_text(folder: Path) -> None:
    tc = json.loads((folder / "tokenizer_config.json").read_text())
    tc["bos_token"] = "<s>"
    (folder / "tokenizer_config.json").write_text(json.dumps(tc))


BAD = [  # (name, write_tiny_hf arguments, damage, what the one line says)
    ("missing-shard", dict(shards=3), _drop_shard, "shard missing"),
    ("index-lists-absent-tensor", dict(shards=3), _index_edit(_drop_first), "the index does not list"),
    ("index-escapes-folder", dict(shards=3), _index_edit(_escape), "is not a file name inside the folder"),
    ("wrong-shape", {}, _edit_config(intermediate_size=128), "is 96x64, config.json needs 128x64"),
    ("unsupported-model-type", {}, _edit_config(model_type="gemma"), "model_type 'gemma' is not supported"),
    ("truncated-safetensors", {}, _truncate, "truncated file"),
    ("header-size-lies", {}, _header_size_lies, "corrupt safetensors file: a header of"),
    ("header-offsets-overlap", {}, _edit_header(_overlap), "overlaps the one before it"),
    ("header-not-utf8", {}, _not_json, "not UTF-8"),
    ("header-duplicate-key", {}, _duplicate_key, "appears twice"),
    ("dtype-i64", {}, _add_tensor("extra", "I64", (4,)), "dtype 'I64'"),
    ("unknown-tensor", {}, _add_tensor("model.layers.0.self_attn.q_proj.bias"), "not part of the llama"),
    (
        "missing-tensor",
        {},
        _drop_tensor("model.layers.1.input_layernorm.weight"),
        "input_layernorm.weight is missing",
    ),
    ("missing-classifier", {}, _drop_tensor("lm_head.weight"), "lm_head.weight is missing (or set tie_word"),
    (
        "rope-yarn",
        {},
        _edit_config(rope_scaling={"rope_type": "yarn", "factor": 4.0}),
        "'yarn' is not supported",
    ),
    ("kv-heads", {}, _edit_config(num_key_value_heads=3), "num_key_value_heads 3 does not divide"),
    (
        "head-count-type",
        {},
        _edit_config(num_attention_heads="4"),
        "num_attention_heads = '4' is not an integer",
    ),
    (
        "shared-expert",
        dict(arch="qwen3moe"),
        _edit_config(shared_expert_intermediate_size=64),
        "no shared expert",
    ),
    ("no-topk-norm", dict(arch="qwen3moe"), _edit_config(norm_topk_prob=False), "norm_topk_prob"),
    ("pre-tokenizer", {}, _pre_tokenizer, 'pre-tokenizer ["Metaspace"] is not supported'),
    ("bos-not-in-vocab", {}, _bos_text, "bos_token '<s>' is not in the vocabulary"),
]


@pytest.mark.parametrize("name,args,damage,needle", BAD, ids=[b[0] for b in BAD])
def test_bad_checkpoint_is_one_line(tmp_path: Path, name: str, args: dict, damage, needle: str) -> None:
    """`convert --hf DIR` of a damaged checkpoint: exit 2, one line naming the problem, no traceback, no
    output or temp file left (time-bounded, address space capped)."""
    hf = write_tiny_hf(tmp_path / "hf", seed=1, **args)
    damage(hf.folder)
    before = sorted(p.name for p in tmp_path.iterdir())
    r = dllama("convert", "--hf", str(hf.folder), "--output", str(tmp_path / "out.gguf"))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith("error: ") and needle in lines[0], lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_bad_folder_through_inference_is_one_line(tmp_path: Path) -> None:
    hf = write_tiny_hf(tmp_path / "hf", seed=1, shards=3)
    _drop_shard(hf.folder)
    r = dllama("--backend", "cpu", "inference", "--model", str(hf.folder), "--prompt", "hi", "--steps", "1")
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].count("shard missing") == 1, r.stderr
    (tmp_path / "empty").mkdir()
    r = dllama("--backend", "cpu", "inference", "--model", str(tmp_path / "empty"), "--prompt", "hi")
    assert r.returncode == 2 and "is a directory without a config.json" in r.stderr, r.stderr


def test_safetensors_header_bounds_are_checked_before_anything_is_read(tmp_path: Path) -> None:
    """A shape of 2^40 x 2^40 values or a 2^60-byte header is refused from the header alone."""
    path = tmp_path / "x.safetensors"
    entry = {"dtype": "F32", "shape": [1 << 40, 1 << 40], "data_offsets": [0, 16]}
    _rewrite(path, {"t": entry}, bytes(16))
    with pytest.raises(DllamaError, match="needs 4835703278458516698824704 bytes, data_offsets span 16"):
        read_safetensors(path)
    path.write_bytes(struct.pack("<Q", 1 << 60) + b"{}")
    with pytest.raises(DllamaError, match="a header of 1152921504606846976 bytes"):
        read_safetensors(path)


# ---- memory ----------------------------------------------------------------------------------------------

PEAK_SCRIPT = """
import sys
from engine.convert import convert
def status(key):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key + ":"))
warm, src, out, wtype = sys.argv[1:]
convert(warm, out + ".warm" + out[-5:], wtype, log=lambda s: None)  # imports and first allocations
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak RSS (VmHWM) starts again from the RSS now
before = status("VmRSS")
convert(src, out, wtype, log=lambda s: None)
print(status("VmHWM") - before)
"""


@pytest.mark.parametrize("out", ["big.gguf", "big.m"])
def test_conversion_memory_is_bounded_by_a_tensor_not_the_model(tmp_path: Path, out: str) -> None:
    """Peak RSS of a bf16 -> Q8_0/Q4_0 conversion grows by a few times the largest tensor (as f32), while
    the checkpoint holds many times that: tensors stream one at a time, their file pages dropped."""
    big = write_tiny_hf(
        tmp_path / "big", dim=512, hidden_dim=2048, n_heads=8, n_kv_heads=4, n_layers=16, dtype="bf16"
    )
    warm = write_tiny_hf(tmp_path / "warm", dim=64, hidden_dim=256, n_layers=1, dtype="bf16")
    bound = 8 * 512 * 2048 * 4  # 8 FFN matrices as float32
    model = sum(p.stat().st_size for p in big.folder.iterdir())
    wtype = "q80" if out.endswith(".gguf") else "q40"
    r = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, str(warm.folder), str(big.folder), str(tmp_path / out), wtype],
        cwd=ROOT, capture_output=True, text=True, timeout=120, preexec_fn=_cap_memory,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    grown = int(r.stdout.split()[-1]) * 1024
    assert model > 3 * bound and grown < bound, (model, grown)


def test_mistral_sliding_window_caps_the_context(tmp_path: Path) -> None:
    """Within a context no longer than the window, sliding-window attention is full attention."""
    folder = write_tiny_hf(tmp_path / "m", context=256).folder
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "mistral", "sliding_window": 32}))
    assert open_model(folder).config.context_len == 32
    (folder / "config.json").write_text(
        json.dumps({**config, "model_type": "mistral", "sliding_window": None})
    )
    assert open_model(folder).config.context_len == 256


def test_a_folder_without_tokenizer_json_asks_for_one(tmp_path: Path) -> None:
    folder = write_tiny_hf(tmp_path / "m", tokenizer=False).folder
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "engine.cli",
            "inference",
            "--model",
            str(folder),
            "--prompt",
            "hi",
            "--steps",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and r.stderr.strip().endswith(
        "has no tokenizer.json: pass --tokenizer FILE (.t or .gguf)"
    )
