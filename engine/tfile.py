"""distributed-llama `.t` tokenizer files (spec section 3.1): the in-memory form; reader and writer below."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.atomic_file import atomic_write
from engine.config import MAX_VOCAB
from engine.errors import DllamaError
from engine.files import open_regular


@dataclass
class TFile:
    """The contents of a `.t` file. `vocab[i]` is token i's raw bytes; `scores[i]` its merge score."""

    vocab: list[bytes]
    scores: list[float]
    bos_id: int
    eos_ids: list[int]
    add_bos: bool
    chat_template: str | None = None
    max_token_length: int = 0  # 0: computed from vocab when written


T_MAGIC = 0x567124
T_MAGIC_LEGACY = 0x567123
T_KEYS = (
    "version",
    "vocab_size",
    "max_token_length",
    "bos_id",
    "eos_id",
    "pad_id",
    "chat_eos_id",
    "chat_template",
    "chat_stop",
    "n_eos_tokens",
    "add_bos",
)
T_KEY_ID = {name: i for i, name in enumerate(T_KEYS)}
# GGUF token types that are not ordinary vocabulary: UNKNOWN, CONTROL, USER_DEFINED.
SPECIAL_TOKEN_TYPES = (2, 3, 4)
BYTE_TOKEN_TYPE = 6


MAX_T_BYTES = 64 << 20  # a .t file may take (the largest real ones hold ~10^5 tokens in a few MB)
MAX_T_HEADER = 8 + 8 * len(T_KEYS)  # every key once


class _Reader:
    def __init__(self, data: bytes, path: str):
        self.data, self.pos, self.path = data, 0, path

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise DllamaError(f"{self.path}: truncated tokenizer file (reading {what} at byte {self.pos})")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def ints(self, fmt: str, what: str) -> tuple:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))

    def count(self, n: int, item_bytes: int, bound: int, what: str) -> int:
        """A count from the header: refused when negative, over `bound`, or more items of at least
        `item_bytes` than the rest of the file holds (checked before anything is read or allocated)."""
        if not 0 <= n <= bound:
            raise DllamaError(
                f"{self.path}: {what} {n} in the tokenizer header is out of range (0 to {bound})"
            )
        if n * item_bytes > len(self.data) - self.pos:
            raise DllamaError(
                f"{self.path}: truncated tokenizer file ({what} {n} needs at least {n * item_bytes} more "
                f"bytes, {len(self.data) - self.pos} are left)"
            )
        return n


def _read_vocab(r: _Reader, size: int) -> tuple[list[bytes], list[float]]:
    r.count(size, 8, MAX_VOCAB, "vocab_size")
    vocab: list[bytes] = []
    scores: list[float] = []
    for i in range(size):
        score, length = r.ints("<fI", f"token {i}")
        vocab.append(r.take(length, f"token {i}"))
        scores.append(score)
    return vocab, scores


def _read_bounded(path: str) -> bytes:
    """The whole of a regular file of at most MAX_T_BYTES (a device, FIFO or huge file is refused)."""
    with open_regular(path) as f:
        try:
            data = f.read(MAX_T_BYTES + 1)
        except OSError as e:
            raise DllamaError(f"{path}: cannot read ({e.strerror})") from None
    if len(data) > MAX_T_BYTES:
        raise DllamaError(f"{path}: over {MAX_T_BYTES >> 20} MiB, too large for a tokenizer file")
    return data


def read_tfile(path: str | Path) -> TFile:
    """Read a distributed-llama `.t` tokenizer file, current (0x567124) or legacy (0x567123) format; every
    count and length is checked against the file before it is used."""
    path = str(path)
    r = _Reader(_read_bounded(path), path)
    (magic,) = r.ints("<i", "the magic")
    if magic == T_MAGIC_LEGACY:
        size, max_len, bos, eos, _pad = r.ints("<IIiii", "the legacy header")
        vocab, scores = _read_vocab(r, size)
        return TFile(vocab, scores, bos, [eos], True, None, max_len)
    if magic != T_MAGIC:
        raise DllamaError(f"{path}: not a distributed-llama tokenizer file (magic {magic & 0xFFFFFFFF:#x})")
    (header_size,) = r.ints("<i", "the header size")
    if not 8 <= header_size <= MAX_T_HEADER or (header_size - 8) % 8:
        raise DllamaError(
            f"{path}: corrupt tokenizer header (header size {header_size}: a multiple of 8 from 8 to "
            f"{MAX_T_HEADER}, one pair per key)"
        )
    n_pairs = (header_size - 8) // 8
    values = r.ints(f"<{2 * n_pairs}i", "the header")
    h: dict[str, int] = {}
    eos_ids: list[int] = []
    for key, value in zip(values[::2], values[1::2], strict=True):
        if not 0 <= key < len(T_KEYS):
            raise DllamaError(f"{path}: unsupported tokenizer header key {key}")
        name = T_KEYS[key]
        if name in h:
            raise DllamaError(f"{path}: tokenizer header key {name} appears twice")
        h[name] = value
        if name in ("eos_id", "chat_eos_id"):
            eos_ids.append(value)
        elif name == "chat_stop":
            r.take(r.count(value, 1, MAX_T_BYTES, "chat_stop"), "the legacy chat_stop text")
    if h.get("version") != 1:
        raise DllamaError(f"{path}: old tokenizer version {h.get('version')} (1 expected), re-convert it")
    for key in ("vocab_size", "max_token_length", "bos_id"):
        if key not in h:
            raise DllamaError(f"{path}: the tokenizer header lacks {key}")
    for key in ("vocab_size", "chat_template", "n_eos_tokens"):
        if h.get(key, 0) < 0:
            raise DllamaError(f"{path}: negative {key} {h[key]} in the tokenizer header")
    if h["max_token_length"] < 1:
        raise DllamaError(f"{path}: max_token_length {h['max_token_length']} must be at least 1")
    template = None
    if h.get("chat_template", 0) > 0:
        raw = r.take(r.count(h["chat_template"], 1, MAX_T_BYTES, "chat_template"), "the chat template")
        template = raw.decode("utf-8", errors="replace")
    n_eos = r.count(h.get("n_eos_tokens", 0), 4, MAX_VOCAB, "n_eos_tokens")
    eos_ids += list(r.ints(f"<{n_eos}i", "the EOS ids"))
    vocab, scores = _read_vocab(r, h["vocab_size"])
    add_bos = bool(h.get("add_bos", 1))
    return TFile(vocab, scores, h["bos_id"], eos_ids, add_bos, template, h["max_token_length"])


def write_tfile(path: str | Path, tf: TFile) -> None:
    """Write `tf` as a current-format `.t` file (pairs in the Python writer's order, with add_bos); atomic."""
    if len(tf.scores) != len(tf.vocab):
        raise DllamaError(f"tokenizer has {len(tf.vocab)} tokens but {len(tf.scores)} scores")
    max_len = tf.max_token_length or max((len(t) for t in tf.vocab), default=1)
    template = tf.chat_template.encode("utf-8") if tf.chat_template else b""
    pairs = [("bos_id", tf.bos_id), ("version", 1), ("vocab_size", len(tf.vocab))]
    pairs.append(("max_token_length", max(1, max_len)))
    if template:
        pairs.append(("chat_template", len(template)))
    pairs += [("n_eos_tokens", len(tf.eos_ids)), ("add_bos", int(tf.add_bos))]
    out = bytearray(struct.pack("<ii", T_MAGIC, 8 + 8 * len(pairs)))
    for key, value in pairs:
        out += struct.pack("<ii", T_KEY_ID[key], value)
    out += template
    out += struct.pack(f"<{len(tf.eos_ids)}i", *tf.eos_ids)
    for token, score in zip(tf.vocab, tf.scores, strict=True):
        out += struct.pack("<fI", score, len(token)) + token
    with atomic_write(path) as f:
        f.write(out)


def gpt2_unicode_to_byte() -> dict[str, int]:
    """The inverse of GPT-2's byte->unicode table: printable bytes stand for themselves, others for 256+k."""
    direct = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {chr(b): b for b in direct}
    shifted = (b for b in range(256) if b not in set(direct))
    table.update({chr(256 + k): b for k, b in enumerate(shifted)})
    return table


def _gpt2_bytes(tokens: list[str], special: np.ndarray) -> list[bytes]:
    inv = gpt2_unicode_to_byte()
    # chr(byte) for every table character; Latin-1 characters outside the table map to a non-Latin-1 marker so
    # that the fast encode fails and the slow path gives them their UTF-8 bytes.
    trans: dict[int, str] = {ord(c): chr(b) for c, b in inv.items()}
    trans.update({c: "\uffff" for c in range(0x80, 0x100) if chr(c) not in inv})
    out: list[bytes] = []
    for tok, is_special in zip(tokens, special.tolist(), strict=True):
        if is_special:
            out.append(tok.encode("utf-8"))
            continue
        try:
            out.append(tok.translate(trans).encode("latin-1"))
        except UnicodeEncodeError:
            out.append(b"".join(bytes([inv[c]]) if c in inv else c.encode("utf-8") for c in tok))
    return out


def _spm_bytes(tokens: list[str], types: np.ndarray) -> list[bytes]:
    out: list[bytes] = []
    for tok, ttype in zip(tokens, types.tolist(), strict=True):
        if ttype == BYTE_TOKEN_TYPE and len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
            out.append(bytes([int(tok[3:5], 16)]))
        else:
            out.append(tok.replace("\u2581", " ").encode("utf-8"))
    return out


def tfile_from_gguf(metadata: dict) -> tuple[TFile, np.ndarray]:
    """Build `.t` contents from GGUF tokenizer metadata, reordered for the C++ program (ids >= bos: special).

    Returns (tfile, order), order[new_id] = old_id: regular tokens first in their order, then bos, then the
    other special tokens (UNKNOWN/CONTROL/USER_DEFINED); identity when the vocabulary is already so.
    """
    kind = metadata.get("tokenizer.ggml.model")
    tokens = metadata.get("tokenizer.ggml.tokens")
    if kind not in ("gpt2", "llama"):
        raise DllamaError(f"GGUF tokenizer model {kind!r} is not supported (gpt2 and llama are)")
    if not tokens:
        raise DllamaError("the GGUF file carries no tokenizer (tokenizer.ggml.tokens is missing)")
    n = len(tokens)
    types = np.asarray(metadata.get("tokenizer.ggml.token_type", [1] * n), dtype=np.int64)
    if types.shape != (n,):
        raise DllamaError(f"tokenizer.ggml.token_type has {types.size} entries for {n} tokens")
    special = np.isin(types, SPECIAL_TOKEN_TYPES)
    bos = metadata.get("tokenizer.ggml.bos_token_id")
    if bos is None:
        if not special.any():
            raise DllamaError("the GGUF tokenizer has no bos_token_id and no special token to use instead")
        bos = int(np.flatnonzero(special)[0])
    eos = metadata.get("tokenizer.ggml.eos_token_id")
    if eos is None:
        raise DllamaError("the GGUF tokenizer has no eos_token_id")
    eos_old = [eos]
    eot = metadata.get("tokenizer.ggml.eot_token_id")
    if eot is not None and eot != eos:
        eos_old.append(eot)
    for tid in (bos, *eos_old):
        if not 0 <= tid < n:
            raise DllamaError(f"GGUF tokenizer token id {tid} is outside the vocabulary of {n}")
    if kind == "gpt2":
        raw = _gpt2_bytes(tokens, special)
        scores_old = None
        llama3 = metadata.get("tokenizer.ggml.pre") in ("llama-bpe", "llama3")  # as llama.cpp and HF default
        add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", llama3))
    else:
        raw = _spm_bytes(tokens, types)
        scores_old = metadata.get("tokenizer.ggml.scores", [0.0] * n)
        add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", True))
    is_special = special.copy()
    is_special[bos] = True
    ids = np.arange(n)
    order = np.concatenate([ids[~is_special], [bos], ids[is_special & (ids != bos)]]).astype(np.int64)
    new_id = np.empty(n, dtype=np.int64)
    new_id[order] = ids
    vocab = [raw[i] for i in order.tolist()]
    scores = [float(-i) for i in range(n)] if scores_old is None else [float(scores_old[i]) for i in order]
    tf = TFile(
        vocab=vocab,
        scores=scores,
        bos_id=int(new_id[bos]),
        eos_ids=[int(new_id[e]) for e in eos_old],
        add_bos=add_bos,
        chat_template=metadata.get("tokenizer.chat_template"),
        max_token_length=max(1, max(len(t) for t in vocab)),
    )
    return tf, order
