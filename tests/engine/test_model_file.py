"""open_model: picks the format from the first bytes and explains files it cannot open."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from tinymodel import write_tiny_gguf

from engine.errors import DllamaError
from engine.gguf_file import load_gguf
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
