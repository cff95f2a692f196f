"""`.t` tokenizer files: round trips, bytes parsed independently, legacy format, and GGUF -> .t conversion."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from tinymodel import write_tiny_gguf

from engine.errors import DllamaError
from engine.gguf_file import read_gguf
from engine.tfile import TFile, read_tfile, tfile_from_gguf, write_tfile

VOCAB = [b"<unk>", b"a", b"b", b"ab", b" \xff\xfe", b"\xe2\x96\x81x", b"<s>", b"</s>"]
SCORES = [0.0, -1.0, -2.0, -3.5, 1.25, -6.0, 0.0, 0.0]


def _sample() -> TFile:
    return TFile(
        list(VOCAB),
        list(SCORES),
        bos_id=6,
        eos_ids=[7, 3],
        add_bos=False,
        chat_template="{{ messages }} ✓",
        max_token_length=0,
    )


def test_round_trip(tmp_path: Path) -> None:
    write_tfile(tmp_path / "a.t", _sample())
    tf = read_tfile(tmp_path / "a.t")
    assert tf.vocab == VOCAB and tf.scores == SCORES
    assert (tf.bos_id, tf.eos_ids, tf.add_bos, tf.chat_template) == (6, [7, 3], False, "{{ messages }} ✓")
    assert tf.max_token_length == 5  # b"<unk>"


def test_written_bytes_parsed_independently(tmp_path: Path) -> None:
    write_tfile(tmp_path / "a.t", _sample())
    raw = (tmp_path / "a.t").read_bytes()
    magic, size = struct.unpack_from("<ii", raw, 0)
    assert magic == 0x567124 and size == 8 + 8 * 7
    pairs = list(struct.iter_unpack("<ii", raw[8:size]))
    template = "{{ messages }} ✓".encode()
    # spec 3.1 writer order: bos_id, version, vocab_size, max_token_length, chat_template, n_eos, add_bos
    assert pairs == [(3, 6), (0, 1), (1, 8), (2, 5), (7, len(template)), (9, 2), (10, 0)]
    pos = size
    assert raw[pos : pos + len(template)] == template
    pos += len(template)
    assert struct.unpack_from("<2i", raw, pos) == (7, 3)
    pos += 8
    for token, score in zip(VOCAB, SCORES, strict=True):
        s, n = struct.unpack_from("<fI", raw, pos)
        assert (s, raw[pos + 8 : pos + 8 + n]) == (score, token)
        pos += 8 + n
    assert pos == len(raw)


def _entries(vocab: list[bytes], scores: list[float]) -> bytes:
    return b"".join(struct.pack("<fI", s, len(t)) + t for t, s in zip(vocab, scores, strict=True))


def test_legacy_format(tmp_path: Path) -> None:
    raw = struct.pack("<iIIiii", 0x567123, 3, 2, 1, 2, -1) + _entries([b"x", b"<s>", b"</s>"], [0.5, 0, 0])
    (tmp_path / "old.t").write_bytes(raw)
    tf = read_tfile(tmp_path / "old.t")
    assert (tf.vocab, tf.scores, tf.bos_id, tf.eos_ids, tf.chat_template) == (
        [b"x", b"<s>", b"</s>"],
        [0.5, 0.0, 0.0],
        1,
        [2],
        None,
    )


def test_legacy_keys_eos_and_chat_stop(tmp_path: Path) -> None:
    pairs = [(0, 1), (1, 2), (2, 3), (3, 1), (4, 0), (5, -1), (6, 1), (8, 5), (10, 1)]
    raw = struct.pack("<ii", 0x567124, 8 + 8 * len(pairs)) + b"".join(struct.pack("<ii", *p) for p in pairs)
    raw += b"STOP!" + _entries([b"end", b"<s>"], [0.0, 0.0])
    (tmp_path / "l.t").write_bytes(raw)
    tf = read_tfile(tmp_path / "l.t")
    assert (tf.vocab, tf.eos_ids, tf.bos_id, tf.add_bos) == ([b"end", b"<s>"], [0, 1], 1, True)
    assert tf.chat_template is None


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b"\x00\x00\x00\x00" + b[4:], "not a distributed-llama tokenizer file"),
        (lambda b: b[:-3], "truncated tokenizer file"),
        (lambda b: b[:30], "truncated tokenizer file"),
        (lambda b: b[:20] + struct.pack("<i", 0) + b[24:], "old tokenizer version 0"),
        (lambda b: b[:16] + struct.pack("<i", 42) + b[20:], "unsupported tokenizer header key 42"),
    ],
)
def test_errors(tmp_path: Path, mutate, message: str) -> None:
    write_tfile(tmp_path / "a.t", _sample())
    (tmp_path / "b.t").write_bytes(mutate((tmp_path / "a.t").read_bytes()))
    with pytest.raises(DllamaError, match=rf"b\.t: {message}"):
        read_tfile(tmp_path / "b.t")
    with pytest.raises(DllamaError, match="no such file"):
        read_tfile(tmp_path / "absent.t")


def test_smollm2_order_moves_specials_behind(smollm2_path: Path) -> None:
    meta, _, _ = read_gguf(smollm2_path)
    tf, order = tfile_from_gguf(meta)
    n = 49152
    assert sorted(order.tolist()) == list(range(n))
    assert order[: n - 17].tolist() == list(range(17, n))  # regular tokens first, original order
    assert order[n - 17] == 1  # bos first of the specials
    assert sorted(order[n - 17 :].tolist()) == list(range(17))
    assert tf.bos_id == n - 17 and tf.vocab[tf.bos_id] == b"<|im_start|>"
    assert [tf.vocab[i] for i in tf.eos_ids] == [b"<|im_end|>"]
    assert all(tf.vocab[i] == meta["tokenizer.ggml.tokens"][order[i]].encode() for i in range(n - 17, n))
    assert tf.vocab[0] == b"!" and tf.vocab[tf.vocab.index(b" the")] == b" the"  # GPT-2 'Ġthe' -> " the"
    assert b"\n" in tf.vocab and tf.scores[:3] == [0.0, -1.0, -2.0]
    assert not tf.add_bos and "named SmolLM" in tf.chat_template


def test_llama3_vocab_is_identity(shared: Path) -> None:
    meta, _, _ = read_gguf(shared / "tokenizers" / "ggml-vocab-llama-bpe.gguf")
    tf, order = tfile_from_gguf(meta)
    assert np.array_equal(order, np.arange(128256))
    # llama-bpe vocabularies add BOS by default, as HF and llama.cpp do
    assert (tf.bos_id, tf.eos_ids, tf.add_bos) == (128000, [128001], True)
    assert tf.vocab[128000] == b"<|begin_of_text|>" and tf.vocab[220] == b" " and tf.vocab[198] == b"\n"


def test_sentencepiece_vocab(shared: Path) -> None:
    meta, _, _ = read_gguf(shared / "tokenizers" / "ggml-vocab-llama-spm.gguf")
    tf, order = tfile_from_gguf(meta)
    n = 32000
    assert order[: n - 3].tolist() == list(range(3, n)) and order[n - 3 :].tolist() == [1, 0, 2]
    assert tf.vocab[:256] == [bytes([b]) for b in range(256)]  # <0xNN> pieces are single raw bytes
    tokens = meta["tokenizer.ggml.tokens"]
    the = tokens.index("▁the")
    assert tf.vocab[the - 3] == b" the"
    assert tf.scores[the - 3] == pytest.approx(meta["tokenizer.ggml.scores"][the])
    assert (tf.vocab[tf.bos_id], [tf.vocab[i] for i in tf.eos_ids], tf.add_bos) == (b"<s>", [b"</s>"], True)


def test_tiny_tokenizer_bytes_and_eot(tmp_path: Path) -> None:
    meta, _, _ = read_gguf(write_tiny_gguf(tmp_path / "t.gguf"))
    tf, order = tfile_from_gguf(meta)
    assert np.array_equal(order, np.arange(288))
    assert tf.vocab[:256] == [bytes([b]) for b in range(256)]
    assert (tf.bos_id, tf.eos_ids) == (256, [257, 258])
    write_tfile(tmp_path / "t.t", tf)
    assert read_tfile(tmp_path / "t.t") == tf


def test_unsupported_tokenizer() -> None:
    with pytest.raises(DllamaError, match="'bert' is not supported"):
        tfile_from_gguf({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]})
