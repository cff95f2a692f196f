"""Tokenizers against llama.cpp's test vectors, the SmolLM2 golden prompts and each other (.t vs GGUF)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.errors import DllamaError
from engine.gguf_file import read_gguf
from engine.tfile import TFile, tfile_from_gguf, write_tfile
from engine.tokenizer import Tokenizer, load_tokenizer, tokenizer_from_gguf, tokenizer_from_tfile

VOCABS = ("llama-bpe", "llama-spm")
# Strings beyond the golden prompts: digits, punctuation, unicode, emoji, whitespace runs, specials in text.
EXTRA = [
    "in 2024 there were 1234567 people, 3.14159 of them",
    "Hello,   world!!  ...\n\n\t x  \n  y",
    "ünïcödé Ελληνικά 日本語 한국어 — “quotes” …",
    "🦙🦙 👍🏽 🇫🇷 emoji",
    "I'm   you'LL  don't WE'VE",
    "   leading and trailing   ",
    "\n\n\n",
    "x <?> <()> <div>",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "a<|im_end|>b<filename>c<|endoftext|>",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhey<|eot_id|>",
    "<s>[INST] hi [/INST]</s>",
    "",
]


def read_vectors(ref: Path, vocab: str) -> list[tuple[str, list[int]]]:
    """llama.cpp's test pairs: .inp strings split at the separator line, .out one id list per line."""
    inp = (ref / f"tokenizers/ggml-vocab-{vocab}.gguf.inp").read_bytes().decode("utf-8")
    out = (ref / f"tokenizers/ggml-vocab-{vocab}.gguf.out").read_bytes().decode("utf-8")
    texts = inp.split("\n__ggml_vocab_test__\n")
    ids = [[int(x) for x in line.split()] for line in out.split("\n")]
    assert len(texts) == len(ids)
    return list(zip(texts, ids, strict=True))


@pytest.fixture(scope="module")
def metas(shared, smollm2_path) -> dict[str, dict]:
    out = {v: read_gguf(shared / f"tokenizers/ggml-vocab-{v}.gguf")[0] for v in VOCABS}
    out["smollm2"] = read_gguf(smollm2_path)[0]
    return out


@pytest.fixture(scope="module")
def toks(metas) -> dict[str, Tokenizer]:
    return {k: tokenizer_from_gguf(m) for k, m in metas.items()}


@pytest.fixture(scope="module")
def tfiles(metas) -> dict[str, tuple[Tokenizer, Tokenizer, list[int]]]:
    """Per vocabulary: (.t tokenizer in C++ order, .t tokenizer in original order, new id of each old id)."""
    out = {}
    for k, meta in metas.items():
        tf, order = tfile_from_gguf(meta)
        order = [int(o) for o in order]
        new_id = [0] * len(order)
        for new, old in enumerate(order):
            new_id[old] = new
        orig = TFile(
            vocab=[b""] * len(order),
            scores=[0.0] * len(order),
            bos_id=order[tf.bos_id],
            eos_ids=[order[e] for e in tf.eos_ids],
            add_bos=tf.add_bos,
            chat_template=tf.chat_template,
        )
        for new, old in enumerate(order):
            orig.vocab[old], orig.scores[old] = tf.vocab[new], tf.scores[new]
        out[k] = (tokenizer_from_tfile(tf), tokenizer_from_tfile(orig), new_id)
    return out


@pytest.fixture(scope="module")
def golden(shared) -> list[dict]:
    return json.loads((shared / "smollm2_golden.json").read_text())["cases"]


@pytest.mark.parametrize("vocab", VOCABS)
def test_gguf_conformance_vectors(shared, toks, vocab):
    pairs = read_vectors(shared, vocab)
    tok = toks[vocab]
    failed = [(text, ids, got) for text, ids in pairs if (got := tok.encode(text, bos=False)) != ids]
    assert failed == []
    assert len(pairs) - len(failed) == 47


@pytest.mark.parametrize("vocab", VOCABS)
def test_tfile_conformance_vectors(shared, tfiles, vocab):
    """The llama.cpp vectors through our own .t encoder, C++ order (ids mapped through the permutation)."""
    cpp, _, new_id = tfiles[vocab]
    pairs = read_vectors(shared, vocab)
    passed = sum(cpp.encode(text, bos=False) == [new_id[i] for i in ids] for text, ids in pairs)
    assert passed == 47


@pytest.mark.parametrize("vocab", VOCABS)
def test_decode_round_trips_vectors(shared, toks, vocab):
    tok = toks[vocab]
    for text, ids in read_vectors(shared, vocab):
        assert tok.decode(ids) == text


def test_smollm2_golden_prompts(toks, golden):
    tok = toks["smollm2"]
    assert len(golden) == 4
    for case in golden:
        assert tok.encode(case["text"]) == case["prompt_ids"], case["text"]
        assert tok.decode(case["prompt_ids"]) == case["text"]


def test_smollm2_flags_and_specials(toks):
    tok = toks["smollm2"]
    assert (tok.vocab_size, tok.bos_id, tok.eos_ids[0], tok.add_bos) == (49152, 1, 2, False)
    assert tok.special_tokens["<|im_start|>"] == 1 and tok.special_tokens["<|im_end|>"] == 2
    assert set(tok.special_ids) == set(range(17))
    assert tok.encode("Hi")[0] != 1 and tok.encode("Hi", bos=True)[0] == 1
    assert tok.token_bytes(504) == b"The" and tok.token_text(1) == "<|im_start|>"
    with pytest.raises(DllamaError, match="outside the vocabulary"):
        tok.token_bytes(49152)


def test_llama_flags_and_specials(toks):
    bpe, spm = toks["llama-bpe"], toks["llama-spm"]
    assert bpe.add_bos and bpe.bos_id == 128000 and bpe.eos_ids[:2] == [128001, 128009]
    ids = bpe.encode("<|start_header_id|>user<|end_header_id|>")
    assert ids[:2] == [128000, 128006] and ids[-1] == 128007 and bpe.decode(ids[2:-1]) == "user"
    assert spm.add_bos and spm.bos_id == 1 and spm.eos_ids == [2]
    ids = spm.encode("Hi</s>")
    assert ids[0] == 1 and ids[-1] == 2 and spm.decode(ids[1:-1]) == "Hi"
    assert spm.token_bytes(spm.special_tokens["</s>"]) == b"</s>" and spm.token_bytes(3) == b"\x00"


def test_tfile_matches_gguf_smollm2(toks, tfiles, golden):
    """Golden prompts and other strings: the .t encoder in both orders gives the GGUF tokenizer's ids."""
    tok = toks["smollm2"]
    cpp, orig, new_id = tfiles["smollm2"]
    assert set(orig.special_ids) == set(range(17))  # found by content, not by position relative to bos
    assert set(cpp.special_ids) == {new_id[i] for i in range(17)}
    assert min(cpp.special_ids) == 49152 - 17  # the C++ order really moved them
    for case in golden:
        assert orig.encode(case["text"]) == case["prompt_ids"]
        assert cpp.encode(case["text"]) == [new_id[i] for i in case["prompt_ids"]]
    for text in EXTRA:
        ids = tok.encode(text, bos=False)
        assert orig.encode(text, bos=False) == ids, text
        assert cpp.encode(text, bos=False) == [new_id[i] for i in ids], text
        assert cpp.decode(cpp.encode(text)) == text


@pytest.mark.parametrize("vocab", VOCABS)
def test_tfile_matches_gguf_extra(toks, tfiles, vocab):
    tok = toks[vocab]
    cpp, orig, new_id = tfiles[vocab]
    for text in EXTRA:
        ids = tok.encode(text, bos=False)
        assert orig.encode(text, bos=False) == ids, text
        assert cpp.encode(text, bos=False) == [new_id[i] for i in ids], text


def test_tfile_bracketed_regular_tokens_stay_regular(toks, tfiles):
    """Llama 3's `<?>` and `<()>` are ordinary merged tokens: the .t encoder must not make them special."""
    tok = toks["llama-bpe"]
    cpp, _, new_id = tfiles["llama-bpe"]
    for text in ("<?>", "<()>"):
        (tid,) = tok.encode(text, bos=False)
        assert tid not in tok.special_ids and new_id[tid] not in cpp.special_ids
    assert len(cpp.special_ids) == 256


def _tiny_spm_tfile() -> TFile:
    """A SentencePiece-style vocabulary: specials, 256 byte-fallback tokens, then scored pieces."""
    pieces = {
        b" ": -10.0,
        b"a": -10.0,
        b"b": -10.0,
        b"c": -10.0,
        b" a": -5.0,
        b"ab": -1.0,
        b"bc": -1.0,
        b" ab": -2.0,
        b"abc": -3.0,
    }
    vocab = [b"<unk>", b"<s>", b"</s>", b"<|im_start|>"] + [bytes([k]) for k in range(256)] + list(pieces)
    scores = [0.0] * 260 + list(pieces.values())
    return TFile(vocab=vocab, scores=scores, bos_id=1, eos_ids=[2], add_bos=True)


def test_tfile_merge_order_and_byte_fallback():
    tok = tokenizer_from_tfile(_tiny_spm_tfile())
    ids = {v: i for i, v in enumerate(_tiny_spm_tfile().vocab) if i >= 260}
    # " abc": ab and bc tie at -1 -> leftmost (ab); then " ab" (-2) beats "abc" (-3); " abc" is no token.
    assert tok.encode("abc", bos=False) == [ids[b" ab"], ids[b"c"]]
    assert tok.encode("abc") == [1, ids[b" ab"], ids[b"c"]]
    # é is not a piece: its two UTF-8 bytes come from the byte-fallback run (id 4 + byte); " " is a piece.
    assert tok.encode("é", bos=False) == [ids[b" "], 4 + 0xC3, 4 + 0xA9]
    # <|im_start|> is special by its content (id 3, not >= bos); each text segment gets the dummy space.
    assert tok.encode("a<|im_start|>a", bos=False) == [ids[b" a"], 3, ids[b" a"]]
    assert tok.decode(tok.encode("abc", bos=False)) == "abc"


def test_tfile_concatenation_is_not_special():
    tf = _tiny_spm_tfile()
    tf.vocab += [b"<b", b">", b"<b>", b"<zz>"]
    tf.scores += [-20.0, -20.0, -20.0, -20.0]
    tok = tokenizer_from_tfile(tf)
    assert "<b>" not in tok.special_tokens  # "<b" + ">" are both tokens: an ordinary merge result
    assert tok.special_tokens["<zz>"] == len(tf.vocab) - 1
    assert tok.encode("<zz>", bos=False) == [len(tf.vocab) - 1]


def test_tfile_byte_level_with_bytes_in_id_order():
    """The test models' vocabulary (bytes 0..255 at ids 0..255, no merges) is byte-level, not fallback."""
    from tinymodel import BOS_ID, EOS_ID, tiny_tokens

    tokens = tiny_tokens(288)
    meta = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [1] * 256 + [3] * 32,
        "tokenizer.ggml.bos_token_id": BOS_ID,
        "tokenizer.ggml.eos_token_id": EOS_ID,
    }
    tok = tokenizer_from_tfile(tfile_from_gguf(meta)[0])
    text = "héllo <|im_start|>x"
    assert not tok.dummy_prefix
    assert tok.encode(text, bos=False) == [*"héllo ".encode(), tok.special_tokens["<|im_start|>"], ord("x")]
    assert tokenizer_from_gguf(meta).encode(text, bos=False) == [*"héllo ".encode(), BOS_ID, ord("x")]


def test_load_tokenizer_files(tmp_path, shared, metas, tfiles):
    tf, _ = tfile_from_gguf(metas["smollm2"])
    write_tfile(tmp_path / "smol.t", tf)
    from_file = load_tokenizer(tmp_path / "smol.t")
    cpp, _, _ = tfiles["smollm2"]
    text = "<|im_start|>user\nWhat is 12+30?<|im_end|>\n"
    assert from_file.encode(text) == cpp.encode(text) and from_file.eos_ids == cpp.eos_ids
    assert from_file.chat_template == metas["smollm2"]["tokenizer.chat_template"]
    vocab_only = load_tokenizer(shared / "tokenizers/ggml-vocab-llama-spm.gguf")
    assert vocab_only.encode("Hello world", bos=False) == [15043, 3186]


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(DllamaError, match="missing.t"):
        load_tokenizer(tmp_path / "missing.t")
    (tmp_path / "junk.t").write_bytes(b"\x01\x02\x03\x04junk")
    with pytest.raises(DllamaError, match="junk.t"):
        load_tokenizer(tmp_path / "junk.t")
    with pytest.raises(DllamaError, match="bert"):
        tokenizer_from_gguf({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]})
    with pytest.raises(DllamaError, match="no tokenizer"):
        tokenizer_from_gguf({"general.architecture": "llama"})
    with pytest.raises(DllamaError, match="malformed merge"):
        tokenizer_from_gguf(
            {
                "tokenizer.ggml.model": "gpt2",
                "tokenizer.ggml.tokens": ["a", "b", "ab"],
                "tokenizer.ggml.merges": ["a b c"],
            }
        )


@pytest.mark.parametrize("name", ["smollm2", "llama-bpe", "llama-spm", "tfile"])
def test_stream_never_splits_characters(toks, tfiles, name):
    tok = tfiles["smollm2"][0] if name == "tfile" else toks[name]
    text = "🦙 über 👍🏽!"
    ids = tok.encode(text, bos=False)
    assert any(not tok.token_bytes(i).decode("utf-8", errors="ignore") for i in ids)  # partial characters
    stream = tok.stream()
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tok.decode(ids) == text
    assert pieces[0] == ""  # the first token is only part of the llama's 4 bytes


def test_stream_incomplete_tail_and_dummy_space(toks):
    spm = toks["llama-spm"]
    first_byte = spm.encode("🦙", bos=False)[1]  # [▁, F0, 9F, A6, 99]
    stream = spm.stream()
    assert stream.push(first_byte) == "" and stream.flush() == "\ufffd"
    ids = spm.encode("Hello world")  # [<s>, ▁Hello, ▁world]
    stream = spm.stream()
    assert "".join(stream.push(i) for i in ids[1:]) == "Hello world"  # dummy-prefix space dropped, as HF does
    stream = spm.stream(at_start=False)
    assert "".join(stream.push(i) for i in ids[1:]) == " Hello world"  # continuing a prompt: keep it
    assert spm.decode(ids) == "<s>Hello world"


# ---- Qwen2.5-Coder: the qwen2 pre-tokenizer against its golden prompts ----------------------------------


def test_qwen25_golden_raw_prompt(qwen25_tokenizer, qwen25_golden):
    meta, arrays = qwen25_golden
    raw = meta["cases"][0]
    assert raw["kind"] == "raw" and raw["prompt_ids"] == arrays["case0_prompt_ids"].tolist()
    assert qwen25_tokenizer.encode(raw["prompt"]) == raw["prompt_ids"]
    assert qwen25_tokenizer.decode(raw["prompt_ids"]) == raw["prompt"]


def test_qwen25_perplexity_text_scores_83_tokens(qwen25_tokenizer, qwen25_golden):
    ppl = qwen25_golden[0]["perplexity"]
    ids = qwen25_tokenizer.encode(ppl["text"])
    assert ids[0] != qwen25_tokenizer.bos_id  # no BOS: every token after the first is scored
    assert len(ids) - 1 == ppl["n_scored"] == 83
    assert qwen25_tokenizer.decode(ids) == ppl["text"]


def test_qwen25_flags_digits_and_specials(qwen25_tokenizer, qwen25_golden):
    tok = qwen25_tokenizer
    assert (tok.vocab_size, tok.bos_id, tok.add_bos) == (151936, 151643, False)
    assert tok.eos_ids[0] == 151645 and set(qwen25_golden[0]["eos"]) <= set(tok.eos_ids)
    assert tok.special_tokens["<|im_start|>"] == 151644 and tok.special_tokens["<|im_end|>"] == 151645
    # qwen2 splits numbers into single digits (Llama 3 keeps runs of 3); '0' is byte 0x30 -> id 0x30 - 0x21
    assert tok.encode("2024") == [17, 15, 17, 19]
    assert tok.encode(" 2024") == [220, 17, 15, 17, 19]
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 151644 and ids[-1] == 151645 and tok.decode(ids[1:-1]) == "user\nhi"
