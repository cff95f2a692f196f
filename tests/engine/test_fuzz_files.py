"""Fuzzed model and tokenizer files through the CLI: truncated, flipped, overflowing, duplicated and special
files each end with exit code 2, at most 3 lines on stderr and no traceback, within a time bound and under a
memory cap; a random flip that happens to leave a valid file may run (exit 0), but must not crash either.

The corpus: the embedded SmolLM2 GGUF (its header on sparse copies of the full size, so that the tensor data
costs no disk), and a tiny GGUF converted to `.m` + `.t`. A share of the cases runs `python -m engine.cli` in
a fresh interpreter; the others run the same `engine.cli.main` in children forked from one interpreter that
imported it once (the import is most of the second a refused case takes). Seeded throughout.
"""

from __future__ import annotations

import importlib
import json
import os
import resource
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
SEED = 10
MEMORY_CAP = 2 << 30  # address space of each CLI run (a valid SmolLM2 run on one thread peaks near 0.6 GiB)
TIME_LIMIT = 60.0  # seconds per case (a refusal takes well under one)
TIMED_OUT = 124
FRESH_EVERY = 12  # every 12th case runs in a fresh interpreter, as do the special files
COMMON = ["--backend", "cpu", "inference", "--prompt", "x", "--steps", "1", "--max-seq-len", "8"]
COMMON += ["--nthreads", "1", "--temperature", "0"]


# ---- an independent walk of a GGUF header (positions of every field, for patching)

_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
STRING, ARRAY, U32, I32, F32 = 8, 9, 4, 5, 6


@dataclass
class Layout:
    """Byte positions in a GGUF header: per key (start, type, value, end); per tensor (start, ndim, end)."""

    kvs: dict[str, tuple[int, int, int, int]]
    tensors: dict[str, tuple[int, int, int]]
    kv_end: int
    info_end: int


def walk(d: bytes) -> Layout:
    def skip(t: int, p: int) -> int:
        if t == STRING:
            return p + 8 + struct.unpack_from("<Q", d, p)[0]
        if t == ARRAY:
            et, n = struct.unpack_from("<IQ", d, p)
            p += 12
            if et in _SCALAR_BYTES:
                return p + n * _SCALAR_BYTES[et]
            for _ in range(n):
                p = skip(et, p)
            return p
        return p + _SCALAR_BYTES[t]

    n_tensors, n_kv = struct.unpack_from("<QQ", d, 8)
    pos, kvs, tensors = 24, {}, {}
    for _ in range(n_kv):
        (n,) = struct.unpack_from("<Q", d, pos)
        tpos = pos + 8 + n
        end = skip(struct.unpack_from("<I", d, tpos)[0], tpos + 4)
        kvs[d[pos + 8 : tpos].decode()] = (pos, tpos, tpos + 4, end)
        pos = end
    kv_end = pos
    for _ in range(n_tensors):
        (n,) = struct.unpack_from("<Q", d, pos)
        npos = pos + 8 + n
        end = npos + 4 + 8 * struct.unpack_from("<I", d, npos)[0] + 4 + 8
        tensors[d[pos + 8 : npos].decode()] = (pos, npos, end)
        pos = end
    return Layout(kvs, tensors, kv_end, pos)


def kv(key: str, vtype: int, payload: bytes) -> bytes:
    """One metadata entry as GGUF stores it."""
    return struct.pack("<Q", len(key)) + key.encode() + struct.pack("<I", vtype) + payload


def gstr(s: str) -> bytes:
    return struct.pack("<Q", len(s.encode())) + s.encode()


# ---- the corpus and the case builders


class Corpus:
    """The files every case derives from, and where cases write theirs."""

    def __init__(self, root: Path, embedded: Path):
        from tinymodel import write_tiny_gguf

        from engine.convert import convert_gguf

        self.root, self.embedded = root, embedded
        self.size = embedded.stat().st_size
        with embedded.open("rb") as f:
            head = f.read(4 << 20)
        self.layout = walk(head)
        self.data_start = (self.layout.info_end + 31) // 32 * 32  # SmolLM2 sets no general.alignment
        self.head = head[: self.data_start]
        self.tiny_gguf = write_tiny_gguf(root / "tiny.gguf", wtype="q40")
        self.tiny_m, self.tiny_t = root / "tiny.m", root / "tiny.t"
        convert_gguf(self.tiny_gguf, self.tiny_m, "q40", self.tiny_t, log=lambda _: None)
        self.m, self.t = self.tiny_m.read_bytes(), self.tiny_t.read_bytes()
        self.m_header = struct.unpack_from("<i", self.m, 4)[0]

    def path(self, name: str, suffix: str) -> Path:
        return self.root / f"{name}{suffix}"

    # GGUF: a header (patched) on a sparse file of the full size, or a prefix of the real file
    def header(self) -> bytearray:
        return bytearray(self.head)

    def kv_value(self, key: str) -> int:
        return self.layout.kvs[key][2]

    def tensor_field(self, name: str, field: str) -> int:
        """Position of a tensor's ndim, dims, type or offset field."""
        _, npos, _ = self.layout.tensors[name]
        nd = struct.unpack_from("<I", self.head, npos)[0]
        return {"ndim": npos, "dims": npos + 4, "type": npos + 4 + 8 * nd, "offset": npos + 8 + 8 * nd}[field]

    def kv_fields(self) -> list[tuple[int, int]]:
        """Byte ranges of the preamble and of each entry's key length, type and value (a string's length, an
        array's type and count)."""
        out = [(0, 24)]
        for start, tpos, vpos, end in self.layout.kvs.values():
            vtype = self.head[tpos]
            head = {STRING: 8, ARRAY: 12}.get(vtype, end - vpos)
            out += [(start, start + 8), (tpos, tpos + 4), (vpos, vpos + head)]
        return out

    def tensor_fields(self) -> list[tuple[int, int]]:
        """Byte ranges of each tensor entry's name length and of its ndim, dims, type and offset."""
        return [
            r for start, npos, end in self.layout.tensors.values() for r in ((start, start + 8), (npos, end))
        ]

    def full(self, name: str, header: bytes, size: int | None = None) -> Path:
        """`header` followed by zeros up to the real file's size (plus what the header grew by), sparse."""
        p = self.path(name, ".gguf")
        p.write_bytes(header)
        grow = max(0, len(header) - len(self.head))
        os.truncate(p, size if size is not None else self.size + grow + 64)
        return p

    def prefix(self, name: str, n: int) -> Path:
        """The first `n` bytes of the real file (a truncated download)."""
        p = self.path(name, ".gguf")
        with self.embedded.open("rb") as src, p.open("wb") as dst:
            while n > 0 and (copied := os.copy_file_range(src.fileno(), dst.fileno(), n)):
                n -= copied
        return p

    def write(self, name: str, suffix: str, data: bytes) -> Path:
        p = self.path(name, suffix)
        p.write_bytes(data)
        return p

    # .m / .t: header pairs (key, value) after the 8-byte magic + size
    @staticmethod
    def pair_pos(data: bytes, key: int) -> int:
        """Position of the value of header key `key` in a .m or .t file."""
        size = struct.unpack_from("<i", data, 4)[0]
        for pos in range(8, size, 8):
            if struct.unpack_from("<i", data, pos)[0] == key:
                return pos + 4
        raise KeyError(key)

    def m_with(self, key: int, value: int) -> bytes:
        d = bytearray(self.m)
        struct.pack_into("<i", d, self.pair_pos(d, key), value)
        return bytes(d)

    def t_with(self, key: int, value: int) -> bytes:
        d = bytearray(self.t)
        struct.pack_into("<i", d, self.pair_pos(d, key), value)
        return bytes(d)

    def t_vocab_start(self) -> int:
        """Where the .t vocabulary entries begin (after header, chat template and EOS ids)."""
        d = self.t
        size = struct.unpack_from("<i", d, 4)[0]
        pairs = dict(struct.iter_unpack("<ii", d[8:size]))
        return size + pairs.get(7, 0) + 4 * pairs.get(9, 0)


Builder = Callable[[Corpus, str], tuple[list[str], Path]]


@dataclass(frozen=True)
class Case:
    """A corrupt input: `build` writes it and returns the CLI arguments and the file an error must name.
    `needle`: text the one-line error must hold; None for a random mutation (exit 0 then allowed)."""

    name: str
    build: Builder
    needle: str | None = ""


def model(path: Path, tokenizer: Path | None = None) -> list[str]:
    """The CLI arguments naming the model (and the tokenizer)."""
    return ["--model", str(path)] + (["--tokenizer", str(tokenizer)] if tokenizer else [])


def gguf_patch(patch: Callable[[Corpus, bytearray], bytes | None]) -> Builder:
    """A full-size GGUF whose header `patch` edits in place (or replaces, when it returns bytes)."""

    def build(c: Corpus, name: str) -> tuple[list[str], Path]:
        h = c.header()
        new = patch(c, h)
        p = c.full(name, h if new is None else new)
        return model(p), p

    return build


def put(fmt: str, where: Callable[[Corpus], int], *values: object) -> Callable[[Corpus, bytearray], None]:
    """Overwrite the field(s) at `where` with `values` packed as `fmt`."""
    return lambda c, h: struct.pack_into(fmt, h, where(c), *values)


def bump(offset: int, delta: int) -> Callable[[Corpus, bytearray], None]:
    """Add `delta` to the uint64 count at `offset` (8: tensors, 16: metadata entries)."""
    return lambda c, h: struct.pack_into("<Q", h, offset, struct.unpack_from("<Q", h, offset)[0] + delta)


def put_str(key: str, text: str) -> Callable[[Corpus, bytearray], None]:
    """Replace a string value by another of the same length."""

    def patch(c: Corpus, h: bytearray) -> None:
        vpos, end = c.layout.kvs[key][2:]
        assert end - vpos - 8 == len(text)
        h[vpos + 8 : end] = text.encode()

    return patch


def at_kv(key: str) -> Callable[[Corpus], int]:
    return lambda c: c.kv_value(key)


def at_tensor(name: str, field: str) -> Callable[[Corpus], int]:
    return lambda c: c.tensor_field(name, field)


def insert_kv(entry: bytes) -> Callable[[Corpus, bytearray], bytes]:
    """Add a metadata entry after the last one (the key count raised by one)."""

    def patch(c: Corpus, h: bytearray) -> bytes:
        struct.pack_into("<Q", h, 16, struct.unpack_from("<Q", h, 16)[0] + 1)
        return bytes(h[: c.layout.kv_end]) + entry + bytes(h[c.layout.kv_end :])

    return patch


def set_kv_type(key: str, vtype: int, value: bytes) -> Callable[[Corpus, bytearray], None]:
    def patch(c: Corpus, h: bytearray) -> None:
        _, tpos, vpos, end = c.layout.kvs[key]
        assert end - vpos == len(value)
        h[tpos : tpos + 4] = struct.pack("<I", vtype)
        h[vpos:end] = value

    return patch


def rename_tensor(old: str, new: str) -> Callable[[Corpus, bytearray], None]:
    def patch(c: Corpus, h: bytearray) -> None:
        start = c.layout.tensors[old][0] + 8
        assert len(old) == len(new) and h[start : start + len(old)] == old.encode()
        h[start : start + len(new)] = new.encode()

    return patch


def nested(depth: int) -> bytes:
    """An array holding an array ... `depth` levels deep, the innermost of one uint32."""
    body = struct.pack("<IQ", U32, 1) + struct.pack("<I", 7)
    for _ in range(depth - 1):
        body = struct.pack("<IQ", ARRAY, 1) + body
    return body


def gguf_prefix(n: Callable[[Corpus], int]) -> Builder:
    def build(c: Corpus, name: str) -> tuple[list[str], Path]:
        p = c.prefix(name, n(c))
        return model(p), p

    return build


def gguf_flip(seed: int, full: bool) -> Builder:
    """Random bytes changed: one in a structural field (a length, type, count, dim, offset or scalar value) of
    a full-size copy, or 1 to 8 anywhere in the header (strings too) of a copy cut just after it."""

    def build(c: Corpus, name: str) -> tuple[list[str], Path]:
        rng = np.random.default_rng([SEED, seed])
        h = c.header()
        if full:
            group = c.kv_fields() if rng.random() < 0.5 else c.tensor_fields()
            start, stop = group[rng.integers(len(group))]
            positions = [int(rng.integers(start, stop))]
        else:
            positions = rng.integers(0, len(h), size=int(rng.integers(1, 9))).tolist()
        for pos in positions:
            h[pos] ^= int(rng.integers(1, 256))
        path = c.full(name, h) if full else c.write(name, ".gguf", bytes(h) + bytes(4096))
        return model(path), path

    return build


def m_file(make: Callable[[Corpus], bytes]) -> Builder:
    """A `.m` model (run with the tiny `.t`) made from the converted one."""

    def build(c: Corpus, name: str) -> tuple[list[str], Path]:
        p = c.write(name, ".m", make(c))
        return model(p, c.tiny_t), p

    return build


def t_file(make: Callable[[Corpus], bytes], gguf_model: bool = False) -> Builder:
    """A `.t` tokenizer made from the converted one, given with the tiny `.m` (or the tiny GGUF)."""

    def build(c: Corpus, name: str) -> tuple[list[str], Path]:
        p = c.write(name, ".t", make(c))
        return model(c.tiny_gguf if gguf_model else c.tiny_m, p), p

    return build


def flipped(data: bytes, seed: int, start: int, stop: int) -> bytes:
    rng = np.random.default_rng([SEED, seed])
    d = bytearray(data)
    for pos in rng.integers(start, stop, size=int(rng.integers(1, 4))).tolist():
        d[pos] ^= int(rng.integers(1, 256))
    return bytes(d)


def retokenized(change: Callable[[list[bytes]], list[bytes]]) -> Callable[[Corpus], bytes]:
    """The tiny `.t` with its vocabulary changed (scores follow; ids of bos/eos kept)."""

    def make(c: Corpus) -> bytes:
        from engine.tfile import read_tfile, write_tfile

        tf = read_tfile(c.tiny_t)
        tf.vocab = change(tf.vocab)
        tf.scores = [float(-i) for i in range(len(tf.vocab))]
        out = c.root / "retokenized.t"
        write_tfile(out, tf)
        return out.read_bytes()

    return make


def swap01(vocab: list[bytes]) -> list[bytes]:
    return [vocab[1], vocab[0], *vocab[2:]]


def special(kind: str, role: str) -> Builder:
    """A FIFO, socket, directory or device given as the model or as the tokenizer."""

    def build(c: Corpus, name: str) -> tuple[list[str], Path]:
        p = c.path(name, "")
        if kind == "fifo":
            os.mkfifo(p)
        elif kind == "socket":
            with socket.socket(socket.AF_UNIX) as s:
                s.bind(str(p))
        elif kind == "directory":
            p.mkdir()
        else:
            p = Path(kind)
        return (model(p) if role == "model" else model(c.tiny_m, p)), p

    return build


def sparse_t(c: Corpus, name: str) -> tuple[list[str], Path]:
    """A valid `.t` padded (sparsely) past the 64 MiB a tokenizer file may take."""
    p = c.write(name, ".t", c.t)
    os.truncate(p, 65 << 20)
    return model(c.tiny_m, p), p


def huge_tensor_count(c: Corpus, name: str) -> tuple[list[str], Path]:
    """A 64 GiB sparse file whose header claims 2^40 tensors: refused at once, not walked."""
    h = c.header()
    struct.pack_into("<Q", h, 8, 1 << 40)
    p = c.full(name, h, size=1 << 36)
    return model(p), p


# ---- the cases

E, TOKENS = "llama.embedding_length", "tokenizer.ggml.tokens"
EPS = "llama.attention.layer_norm_rms_epsilon"
TRUNCATE_GGUF: dict[str, Callable[[Corpus], int]] = {
    "empty": lambda c: 0,
    "magic": lambda c: 3,
    "version": lambda c: 6,
    "tensor-count": lambda c: 12,
    "kv-count": lambda c: 20,
    "first-key": lambda c: 40,
    "first-value": lambda c: 60,
    "array-header": lambda c: c.kv_value(TOKENS) + 6,
    "tokens": lambda c: c.kv_value(TOKENS) + 4000,
    "token-types": lambda c: c.kv_value("tokenizer.ggml.token_type") + 100,
    "merges": lambda c: c.kv_value("tokenizer.ggml.merges") + 50_000,
    "chat-template": lambda c: c.kv_value("tokenizer.chat_template") + 100,
    "kv-end": lambda c: c.layout.kv_end,
    "tensor-name": lambda c: c.layout.kv_end + 12,
    "tensor-dims": lambda c: c.tensor_field("blk.3.ffn_up.weight", "dims") + 3,
    "tensor-offset": lambda c: c.tensor_field("output_norm.weight", "offset") + 2,
    "info-end": lambda c: c.layout.info_end,
    "data-start": lambda c: c.data_start,
    "first-tensor": lambda c: c.data_start + 1000,
    "mid-file": lambda c: c.size // 2,
    "last-byte": lambda c: c.size - 1,
}
PATCH_GGUF: dict[str, tuple[Callable[[Corpus, bytearray], bytes | None], str]] = {
    "dims-2^32x2^32": (put("<QQ", at_tensor("token_embd.weight", "dims"), 1 << 32, 1 << 32), "token_embd"),
    "dims-2^62x4": (put("<QQ", at_tensor("token_embd.weight", "dims"), 1 << 62, 4), "token_embd"),
    "dim-0": (put("<Q", at_tensor("blk.0.ffn_norm.weight", "dims"), 0), "blk.0.ffn_norm.weight"),
    "row-not-blocks": (put("<Q", at_tensor("blk.0.attn_q.weight", "dims"), 575), "blk.0.attn_q.weight"),
    "ndim-0": (put("<I", at_tensor("blk.2.attn_k.weight", "ndim"), 0), "blk.2.attn_k.weight"),
    "ndim-5": (put("<I", at_tensor("blk.2.attn_k.weight", "ndim"), 5), "blk.2.attn_k.weight"),
    "tensor-type-99": (put("<I", at_tensor("blk.4.ffn_up.weight", "type"), 99), "blk.4.ffn_up.weight"),
    "tensor-type-i32": (put("<I", at_tensor("blk.4.attn_norm.weight", "type"), 26), "blk.4.attn_norm.weight"),
    "offset-misaligned": (put("<Q", at_tensor("blk.5.attn_v.weight", "offset"), 33), "alignment"),
    "offset-2^63": (put("<Q", at_tensor("output_norm.weight", "offset"), 1 << 63), "output_norm.weight"),
    "version-1": (put("<I", lambda c: 4, 1), "version 1"),
    "version-4": (put("<I", lambda c: 4, 4), "version 4"),
    "kv-count-2^40": (put("<Q", lambda c: 16, 1 << 40), "metadata key count"),
    "kv-count-plus-1": (bump(16, 1), ""),
    "tensor-count-minus-1": (bump(8, -1), "missing"),
    "tensor-count-plus-1": (bump(8, 1), ""),
    "key-length-2^62": (put("<Q", lambda c: 24, 1 << 62), "metadata key"),
    "string-length-2^40": (put("<Q", at_kv("general.name"), 1 << 40), "general.name"),
    "array-length-2^40": (put("<Q", lambda c: c.kv_value(TOKENS) + 4, 1 << 40), TOKENS),
    "array-length-2^22": (put("<Q", lambda c: c.kv_value(TOKENS) + 4, 1 << 22), ""),
    "value-type-99": (put("<I", lambda c: c.layout.kvs["llama.block_count"][1], 99), "value type 99"),
    "array-type-99": (put("<I", at_kv("general.languages"), 99), "value type 99"),
    "nested-arrays": (insert_kv(kv("x.nested", ARRAY, nested(6))), "nests arrays"),
    "alignment-0": (insert_kv(kv("general.alignment", U32, struct.pack("<I", 0))), "general.alignment 0"),
    "alignment-3": (insert_kv(kv("general.alignment", U32, struct.pack("<I", 3))), "general.alignment 3"),
    "alignment-2^31": (
        insert_kv(kv("general.alignment", U32, struct.pack("<I", 1 << 31))),
        "general.alignment",
    ),
    "alignment-string": (insert_kv(kv("general.alignment", STRING, gstr("32"))), "general.alignment '32'"),
    "duplicate-key": (insert_kv(kv("llama.block_count", U32, struct.pack("<I", 2))), "appears twice"),
    "duplicate-tensor": (rename_tensor("blk.1.attn_q.weight", "blk.0.attn_q.weight"), "appears twice"),
    "block-count-0": (put("<I", at_kv("llama.block_count"), 0), "llama.block_count 0"),
    "block-count-2^31": (put("<I", at_kv("llama.block_count"), 1 << 31), "llama.block_count"),
    "head-count-0": (put("<I", at_kv("llama.attention.head_count"), 0), "head_count 0"),
    "kv-heads-0": (put("<I", at_kv("llama.attention.head_count_kv"), 0), "head_count_kv 0"),
    "kv-heads-not-dividing": (put("<I", at_kv("llama.attention.head_count_kv"), 2), "head_count_kv 2"),
    "embedding-0": (put("<I", at_kv(E), 0), f"{E} 0"),
    "embedding-2^31": (put("<I", at_kv(E), 1 << 31), E),
    "context-negative": (
        set_kv_type("llama.context_length", I32, struct.pack("<i", -1)),
        "context_length -1",
    ),
    "eps-nan": (put("<f", at_kv(EPS), float("nan")), f"{EPS} nan"),
    "eps-0": (put("<f", at_kv(EPS), 0.0), f"{EPS} 0"),
    "theta-inf": (put("<f", at_kv("llama.rope.freq_base"), float("inf")), "freq_base inf"),
    "head-dim-odd": (put("<I", at_kv("llama.rope.dimension_count"), 63), "head_dim 63"),
    "ffn-length": (put("<I", at_kv("llama.feed_forward_length"), 1024), "ffn_"),
    "vocab-size-smaller": (put("<I", at_kv("llama.vocab_size"), 49151), "token_embd.weight"),
    "bos-out-of-range": (put("<I", at_kv("tokenizer.ggml.bos_token_id"), 60000), "bos_token_id 60000"),
    "eos-a-float": (set_kv_type("tokenizer.ggml.eos_token_id", F32, struct.pack("<f", 2.0)), "eos_token_id"),
    "tokenizer-bert": (put_str("tokenizer.ggml.model", "bert"), "'bert'"),
    "arch-gemma": (put_str("general.architecture", "gemma"), "'gemma'"),
}
M_KEYS = {"dim": 2, "hidden_dim": 3, "n_layers": 4, "n_heads": 5, "n_kv_heads": 6, "n_experts": 7}
M_KEYS |= {"vocab_size": 9, "max_seq_len": 10, "rope_theta": 12, "weights_float_type": 13, "rope_type": 18}
M_KEYS |= {"head_dim": 19, "norm_epsilon": 20, "arch_type": 1}
PATCH_M: dict[str, tuple[str, int, str]] = {
    "n-layers-2^31-1": ("n_layers", 2**31 - 1, "n_layers 2147483647"),
    "n-layers-0": ("n_layers", 0, "n_layers"),
    "n-layers-4096": ("n_layers", 4096, "wrong file size"),
    "dim-0": ("dim", 0, "dim"),
    "dim-2^30": ("dim", 1 << 30, "dim 1073741824"),
    "hidden-dim-0": ("hidden_dim", 0, "hidden_dim"),
    "hidden-dim-97": ("hidden_dim", 97, ""),
    "vocab-negative": ("vocab_size", -1, "vocab_size"),
    "vocab-2^31-1": ("vocab_size", 2**31 - 1, "vocab_size 2147483647"),
    "n-heads-0": ("n_heads", 0, "n_heads"),
    "kv-heads-3": ("n_kv_heads", 3, "n_kv_heads 3"),
    "kv-heads-8": ("n_kv_heads", 8, "n_kv_heads 8"),
    "head-dim-15": ("head_dim", 15, "head_dim 15"),
    "head-dim-0": ("head_dim", 0, "head_dim 0"),
    "head-dim-2^20": ("head_dim", 1 << 20, "head_dim"),
    "context-0": ("max_seq_len", 0, "max_seq_len"),
    "context-negative": ("max_seq_len", -5, "max_seq_len"),
    "theta-negative": ("rope_theta", -1, "rope_theta -1"),
    "eps-code-9": ("norm_epsilon", 9, "norm_epsilon code 9"),
    "weight-type-99": ("weights_float_type", 99, ""),
    "arch-unknown": ("arch_type", 0x1234, "0x1234"),
    "experts-on-llama": ("n_experts", 8, "experts"),
}
M_TRUNCATE: dict[str, Callable[[Corpus], int]] = {
    "empty": lambda c: 0,
    "magic": lambda c: 3,
    "header-size": lambda c: 6,
    "pairs": lambda c: 40,
    "header": lambda c: c.m_header - 1,
    "after-header": lambda c: c.m_header + 64,
    "mid": lambda c: len(c.m) // 2,
    "last-byte": lambda c: len(c.m) - 1,
}
T_TRUNCATE: dict[str, Callable[[Corpus], int]] = {
    "empty": lambda c: 0,
    "magic": lambda c: 3,
    "header-size": lambda c: 6,
    "pairs": lambda c: 40,
    "vocab": lambda c: c.t_vocab_start() + 500,
    "last-byte": lambda c: len(c.t) - 1,
}
T_KEYS = {
    "vocab_size": 1,
    "max_token_length": 2,
    "bos_id": 3,
    "chat_template": 7,
    "n_eos_tokens": 9,
    "version": 0,
}
PATCH_T: dict[str, tuple[str, int, str]] = {
    "vocab-2^31-1": ("vocab_size", 2**31 - 1, "vocab_size 2147483647"),
    "vocab-negative": ("vocab_size", -1, "vocab_size -1"),
    "vocab-1000": ("vocab_size", 1000, "vocab_size 1000"),
    "n-eos-2^30": ("n_eos_tokens", 1 << 30, "n_eos_tokens"),
    "template-2^30": ("chat_template", 1 << 30, "chat_template"),
    "max-token-length-0": ("max_token_length", 0, "max_token_length"),
    "version-2": ("version", 2, "version 2"),
    "bos-5000": ("bos_id", 5000, "5000"),
}


def _t_raw(offset: int, fmt: str, value: int) -> Callable[[Corpus], bytes]:
    def make(c: Corpus) -> bytes:
        d = bytearray(c.t)
        struct.pack_into(fmt, d, offset if offset >= 0 else c.t_vocab_start() + 4, value)
        return bytes(d)

    return make


def _m_raw(offset: int, fmt: str, value: int) -> Callable[[Corpus], bytes]:
    def make(c: Corpus) -> bytes:
        d = bytearray(c.m)
        struct.pack_into(fmt, d, offset, value)
        return bytes(d)

    return make


def _cases() -> list[Case]:
    cases = [Case(f"gguf-truncated-{k}", gguf_prefix(n)) for k, n in TRUNCATE_GGUF.items()]
    cases += [Case(f"gguf-{k}", gguf_patch(p), needle) for k, (p, needle) in PATCH_GGUF.items()]
    cases.append(Case("gguf-tensor-count-2^40-sparse", huge_tensor_count, "tensor count 1099511627776"))
    cases += [Case(f"gguf-flip-field-{i}", gguf_flip(i, True), None) for i in range(24)]
    cases += [Case(f"gguf-flip-header-{i}", gguf_flip(100 + i, False), None) for i in range(12)]
    cases += [Case(f"m-truncated-{k}", m_file(lambda c, n=n: c.m[: n(c)])) for k, n in M_TRUNCATE.items()]
    cases += [
        Case("m-extra-byte", m_file(lambda c: c.m + b"\0"), "extra bytes"),
        Case("m-header-size-huge", m_file(_m_raw(4, "<I", 2**31 + 8)), "header size"),
        Case("m-header-size-12", m_file(_m_raw(4, "<I", 12)), "header size 12"),
        Case("m-header-size-4", m_file(_m_raw(4, "<I", 4)), "header size 4"),
        Case("m-duplicate-key", m_file(_m_raw(8, "<i", M_KEYS["dim"])), "dim appears twice"),
        Case("m-unknown-key", m_file(_m_raw(8, "<i", 99)), "key 99"),
    ]
    cases += [
        Case(f"m-{k}", m_file(lambda c, key=key, v=v: c.m_with(M_KEYS[key], v)), needle)
        for k, (key, v, needle) in PATCH_M.items()
    ]
    cases += [
        Case(f"m-flip-header-{i}", m_file(lambda c, i=i: flipped(c.m, 200 + i, 0, c.m_header)), None)
        for i in range(12)
    ]
    cases += [
        Case(f"m-flip-data-{i}", m_file(lambda c, i=i: flipped(c.m, 300 + i, c.m_header, len(c.m))), None)
        for i in range(3)
    ]
    cases += [
        Case(f"t-truncated-{k}", t_file(lambda c, n=n: c.t[: n(c)]), "truncated")
        for k, n in T_TRUNCATE.items()
    ]
    cases += [
        Case(f"t-{k}", t_file(lambda c, key=key, v=v: c.t_with(T_KEYS[key], v)), needle)
        for k, (key, v, needle) in PATCH_T.items()
    ]
    cases += [
        Case("t-header-size-2^30", t_file(_t_raw(4, "<i", 1 << 30)), "header size"),
        Case("t-header-size-12", t_file(_t_raw(4, "<i", 12)), "header size 12"),
        Case("t-duplicate-key", t_file(_t_raw(8, "<i", 1)), "vocab_size appears twice"),
        Case("t-unknown-key", t_file(_t_raw(8, "<i", 77)), "key 77"),
        Case("t-token-length-2^31", t_file(_t_raw(-1, "<I", 1 << 31)), "truncated"),
        Case("t-legacy-magic", t_file(_t_raw(0, "<i", 0x567123))),
        Case("t-over-64-MiB", sparse_t, "too large"),
        Case("t-fewer-tokens", t_file(retokenized(lambda v: v[:280])), "280 tokens"),
        Case("t-more-tokens", t_file(retokenized(lambda v: [*v, b"a1", b"a2"])), "290 tokens"),
        Case("t-other-vocab-same-size", t_file(retokenized(swap01), gguf_model=True), "token 0 differs"),
    ]
    cases += [
        Case(f"t-flip-{i}", t_file(lambda c, i=i: flipped(c.t, 400 + i, 0, 600)), None) for i in range(10)
    ]
    for role in ("model", "tokenizer"):
        for kind in ("fifo", "socket", "directory", "/dev/zero", "/dev/null"):
            what = {"fifo": "FIFO", "socket": "socket", "directory": "directory"}.get(
                kind, "character device"
            )
            cases.append(Case(f"{role}-{kind.strip('/').replace('/', '-')}", special(kind, role), what))
    return cases


CASES = _cases()
SPECIAL_NAMES = {c.name for c in CASES if c.name.startswith(("model-", "tokenizer-"))}


# ---- running each case: in a fresh interpreter, or in a child forked from one that imported the CLI


def limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))


def _wait(pid: int, start: float) -> int:
    """The child's exit code (negative: killed by that signal); TIMED_OUT once it outlives TIME_LIMIT."""
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() - start > TIME_LIMIT:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return TIMED_OUT
        time.sleep(0.005)


def run_forked(argv: list[str]) -> dict:
    """`engine.cli.main(argv)` in a forked child under the memory cap, stdout discarded, stderr kept. An
    uncaught exception ends the child as it would end a fresh interpreter: a traceback and exit code 1."""
    import engine.cli

    with tempfile.TemporaryFile() as err:
        start = time.monotonic()
        pid = os.fork()
        if pid == 0:  # the child never returns
            code = 1
            try:
                limit_memory()
                null = os.open(os.devnull, os.O_RDWR)
                os.dup2(null, 0)
                os.dup2(null, 1)
                os.dup2(err.fileno(), 2)
                sys.stdout, sys.stderr = open(1, "w", closefd=False), open(2, "w", closefd=False)
                engine.cli.main(argv)
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else int(e.code is not None)
            except BaseException:
                traceback.print_exc()
            finally:
                try:
                    sys.stderr.flush()
                finally:
                    os._exit(code)
        rc = _wait(pid, start)
        err.seek(0)
        return {
            "rc": rc,
            "stderr": err.read().decode("utf-8", "replace"),
            "seconds": time.monotonic() - start,
        }


PRELOADED = (
    "cpu_fallback.backend",
    "engine.cli",
    "engine.loader",
    "engine.generate",
    "sentencepiece",
    "tokenizers",
)


def drive() -> None:
    """The forking interpreter: imports what every case imports once (nothing that starts threads: numba's
    start in each child), runs every argv list read (JSON) from stdin in its own child, writes the results
    (JSON) to stdout."""
    import typer

    from engine.arch import registry

    for name in PRELOADED:
        importlib.import_module(name)
    registry()
    cli = importlib.import_module("engine.cli")
    typer.main.get_command(cli.app).make_context("dllama", COMMON[:3])  # typer's lazy imports, parsing only
    argvs = json.load(sys.stdin)
    json.dump([run_forked(argv) for argv in argvs], sys.stdout)


def run_fresh(argv: list[str]) -> dict:
    """`python -m engine.cli argv` under the memory cap and TIME_LIMIT."""
    start = time.monotonic()
    try:
        r = subprocess.run(
            [sys.executable, "-m", "engine.cli", *argv],
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            timeout=TIME_LIMIT,
            preexec_fn=limit_memory,
        )
        rc, stderr = r.returncode, r.stderr.decode("utf-8", "replace")
    except subprocess.TimeoutExpired as e:
        rc, stderr = TIMED_OUT, (e.stderr or b"").decode("utf-8", "replace")
    return {"rc": rc, "stderr": stderr, "seconds": time.monotonic() - start}


def run_all(jobs: dict[str, list[str]], fresh: set[str]) -> dict[str, dict]:
    """Every job, two at a time: the forked ones in one driver interpreter, the fresh ones one after another
    beside it."""
    forked = [name for name in jobs if name not in fresh]
    code = f"import sys; sys.path[:0] = {[str(ROOT / 'tests'), str(ROOT / 'tests' / 'engine')]!r}; "
    code += "import test_fuzz_files; test_fuzz_files.drive()"
    with tempfile.TemporaryFile() as argvs, tempfile.TemporaryFile() as out:
        argvs.write(json.dumps([jobs[name] for name in forked]).encode())
        argvs.seek(0)
        driver = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdin=argvs, stdout=out)
        results = {name: run_fresh(jobs[name]) for name in jobs if name in fresh}
        assert driver.wait(timeout=TIME_LIMIT * (len(forked) + 1)) == 0
        out.seek(0)
        results.update(zip(forked, json.load(out), strict=True))
    return results


# ---- the test


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path) -> dict[str, tuple[dict, Path]]:
    """Every case built and run once; its result and the file its error must name."""
    corpus = Corpus(tmp_path_factory.mktemp("fuzz"), smollm2_path)
    jobs, subjects = {}, {}
    for case in CASES:
        args, subjects[case.name] = case.build(corpus, case.name)
        jobs[case.name] = COMMON + args
    fresh = SPECIAL_NAMES | {c.name for i, c in enumerate(CASES) if i % FRESH_EVERY == 0}
    results = run_all(jobs, fresh)
    return {name: (results[name], subjects[name]) for name in jobs}


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_bad_file_ends_in_one_line(outcomes: dict[str, tuple[dict, Path]], case: Case) -> None:
    result, subject = outcomes[case.name]
    rc, stderr = result["rc"], result["stderr"]
    assert rc != TIMED_OUT, f"still running after {TIME_LIMIT} s"
    assert "Traceback" not in stderr, stderr
    assert len(stderr.strip().splitlines()) <= 3, stderr
    if case.needle is None:  # a random mutation may leave a valid file
        assert rc in (0, 2), stderr
        return
    assert rc == 2, stderr
    assert case.needle in stderr, stderr
    assert str(subject) in stderr, stderr
