"""open_model: picks the format from the first bytes and explains files it cannot open; what every reader
shares: ModelConfig.validate, and the rules for a tokenizer that does not match the model."""

from __future__ import annotations

import dataclasses
import math
import struct
from pathlib import Path

import numpy as np
import pytest
from tinymodel import write_tiny_gguf

from engine.arch.base import gguf_key_names
from engine.config import ModelConfig, RopeScaling
from engine.convert import convert_gguf
from engine.errors import DllamaError
from engine.gguf_file import load_gguf
from engine.loader import check_vocab_sizes, load
from engine.mfile import write_m
from engine.model_file import open_model
from engine.tfile import TFile, write_tfile
from engine.weights import Weight, vector_f32


def test_dispatch_by_content_not_name(tmp_path: Path) -> None:
    gguf_path = write_tiny_gguf(tmp_path / "model.m")  # a GGUF despite its name
    m = open_model(gguf_path)
    assert m.kind == "gguf" and m.config.dim == 64
    write_m(tmp_path / "model.gguf", m, "q80")  # a .m despite its name
    m2 = open_model(str(tmp_path / "model.gguf"))
    assert m2.kind == "m" and m2.config == m.config and m2.weights["blk.1.attn_q.weight"].dtype == "q80"
    assert load_gguf(gguf_path).config == m.config


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty file"),
        (b"hello world\n", "unknown file format"),
        (b"GG", "unknown file format"),
        (struct.pack("<ii", 0xABCD00, 8), "old model format"),
    ],
)
def test_foreign_files(tmp_path: Path, content: bytes, message: str) -> None:
    p = tmp_path / "x.bin"
    p.write_bytes(content)
    with pytest.raises(DllamaError, match=rf"x\.bin: {message}") as e:
        open_model(p)
    assert "\n" not in str(e.value)


def test_missing_directory_and_tokenizer(tmp_path: Path) -> None:
    with pytest.raises(DllamaError, match=r"absent\.m: no such file \(expected a GGUF file or a distributed"):
        open_model(tmp_path / "absent.m")
    with pytest.raises(DllamaError, match="is a directory"):
        open_model(tmp_path)
    write_tfile(tmp_path / "tok.t", TFile([b"a", b"<s>"], [0.0, 0.0], 1, [1], True))
    with pytest.raises(DllamaError, match=r"tok\.t: this is a distributed-llama tokenizer"):
        open_model(tmp_path / "tok.t")


def test_vector_decoder_reads_bf16_and_f16_as_numbers():
    """The one decoder of 1-D weights both backends use: bf16 bits [1.5, 0.25] are 0x3FC0, 0x3E80."""
    bf16 = Weight("n", "bf16", 1, 2, np.array([[0x3FC0, 0x3E80]], np.uint16))
    f16 = Weight("n", "f16", 1, 2, np.array([[1.5, 0.25]], np.float16))
    assert vector_f32(bf16).tolist() == vector_f32(f16).tolist() == [1.5, 0.25]


GOOD = ModelConfig(
    "llama",
    dim=64,
    hidden_dim=96,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    head_dim=16,
    vocab_size=288,
    context_len=256,
)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"n_layers": 0}, "llama.block_count 0 is out of range"),
        ({"n_layers": 2**31 - 1}, "llama.block_count 2147483647 is out of range"),
        ({"n_heads": 0}, "llama.attention.head_count 0"),
        ({"n_kv_heads": 3}, "llama.attention.head_count_kv 3 does not divide the 4 attention heads"),
        ({"n_kv_heads": 8}, "llama.attention.head_count_kv 8 is out of range"),
        ({"head_dim": 15}, "head_dim 15 is odd"),
        ({"dim": 0}, "llama.embedding_length 0"),
        ({"vocab_size": 0}, "vocab_size 0"),
        ({"context_len": -1}, "llama.context_length -1"),
        ({"norm_eps": math.nan}, "llama.attention.layer_norm_rms_epsilon nan"),
        ({"norm_eps": 0.0}, "llama.attention.layer_norm_rms_epsilon 0.0"),
        ({"rope_theta": math.inf}, "llama.rope.freq_base inf"),
        (
            {"rope_scaling": RopeScaling(8.0, 4.0, 1.0, 8192)},
            "llama.rope.scaling.low_freq_factor 4.0 must be below",
        ),
        ({"rope_scaling": RopeScaling(8.0, 1.0, 4.0, 0)}, "llama.rope.scaling.original_context_length 0"),
        ({"n_experts": 4, "n_active_experts": 5, "moe_hidden_dim": 32}, "llama.expert_used_count 5"),
        ({"n_active_experts": 2}, "llama.expert_used_count 2"),
        ({"dim": 64.0}, "llama.embedding_length 64.0 is not an integer"),
        ({"arch": "gemma"}, "arch 'gemma' is not a supported architecture"),
    ],
)
def test_config_validation_names_the_field(change: dict, message: str) -> None:
    GOOD.validate("x.gguf", gguf_key_names("llama"))
    with pytest.raises(DllamaError, match=rf"^x\.gguf: {message}") as e:
        dataclasses.replace(GOOD, **change).validate("x.gguf", gguf_key_names("llama"))
    assert "\n" not in str(e.value)


def test_tokenizer_size_rules(capsys: pytest.CaptureFixture[str]) -> None:
    """Equal sizes pass silently; a model with at most min(1% of its rows, 1024) more rows than tokens passes
    with one warning (distributed-llama's Qwen3 tokenizer: 151669 tokens, 151936 rows); more is refused."""
    check_vocab_sizes(288, 288, "t.t", "m.m")
    assert capsys.readouterr().err == ""
    check_vocab_sizes(151669, 151936, "qwen3.t", "qwen3.m")
    warning = capsys.readouterr().err.strip().splitlines()
    assert len(warning) == 1 and "151669" in warning[0] and "151936" in warning[0]
    check_vocab_sizes(151936 - 1024, 151936, "t.t", "m.m")  # the 1024 bound
    with pytest.raises(DllamaError, match=r"t\.t has 150911 tokens but the model m\.m 151936"):
        check_vocab_sizes(151936 - 1025, 151936, "t.t", "m.m")
    check_vocab_sizes(286, 288, "t.t", "m.m")  # 1% of 288 rounds down to 2
    with pytest.raises(DllamaError, match="285 tokens"):
        check_vocab_sizes(285, 288, "t.t", "m.m")
    with pytest.raises(DllamaError, match="289 tokens but the model m.m only 288"):
        check_vocab_sizes(289, 288, "t.t", "m.m")


def test_gguf_model_takes_a_tokenizer_with_its_own_tokens(tmp_path: Path) -> None:
    """--tokenizer with a GGUF model: a .t of the very same tokens is accepted (the refusal of other tokens
    is in test_fuzz_files)."""
    g = write_tiny_gguf(tmp_path / "t.gguf", wtype="q40")
    convert_gguf(g, tmp_path / "t.m", "q40", tmp_path / "t.t", log=lambda _: None)
    loaded = load(str(g), str(tmp_path / "t.t"), n_threads=1, max_seq_len=8)
    assert loaded.tokenizer.vocab_size == 288 and loaded.tokenizer.token_bytes(256) == b"<|im_start|>"
