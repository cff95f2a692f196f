"""Tokenizers: GGUF `gpt2` (byte-level BPE), GGUF `llama` (SentencePiece) and distributed-llama `.t` files.

All three share decoding (token bytes, streaming UTF-8) and differ only in how text becomes ids. The `.t`
encoder is our own: special tokens are recognised by content (not by id), the text is split at them,
pre-split with a regex that fits the vocabulary, and merged greedily by score.
"""

from __future__ import annotations

import codecs
import heapq
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from engine.errors import DllamaError
from engine.files import open_regular
from engine.tfile import TFile, read_tfile

# GGUF token types (equal to SentencePiece piece types).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPECIAL_TYPES = (UNKNOWN, CONTROL, USER_DEFINED)

# Texts of control tokens that end a turn or a document, besides the declared EOS.
END_TEXTS = (
    "<|eot_id|>",
    "<|eom_id|>",
    "<|im_end|>",
    "<|end_of_text|>",
    "<|endoftext|>",
    "<|end|>",
    "<end_of_turn>",
    "<｜end▁of▁sentence｜>",
)

# Pre-tokenizer regexes (Oniguruma syntax, run by the tokenizers library).
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")

# tokenizer.ggml.pre values -> pre-split style; anything else gets plain GPT-2.
PRE_STYLES = {
    "llama-bpe": "llama3",
    "llama3": "llama3",
    "llama-v3": "llama3",
    "qwen2": "qwen2",
    "deepseek-r1-qwen": "qwen2",
    "smollm": "digits+gpt2",
    "starcoder": "digits+gpt2",
}

_BRACKETED = re.compile(r"<[^<>\s]+>")


def _one_line(e: Exception) -> str:
    """A library's error message on one line (some span several)."""
    return " ".join(str(e).split())


def gpt2_byte_table() -> list[str]:
    """GPT-2's byte -> printable character table, indexed by byte (how byte-level vocabularies spell it)."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(0x100 + shifted)
            shifted += 1
    return [table[b] for b in range(256)]


def _pre_tokenizer(style: str) -> Any:
    """A tokenizers pre-tokenizer that splits text (not bytes) the way the named style does."""
    from tokenizers import Regex
    from tokenizers import pre_tokenizers as pt

    if style == "llama3":
        return pt.Split(Regex(LLAMA3_SPLIT), behavior="isolated")
    if style == "qwen2":
        return pt.Split(Regex(QWEN2_SPLIT), behavior="isolated")
    gpt2 = pt.Split(Regex(GPT2_SPLIT), behavior="isolated")
    if style == "digits+gpt2":
        return pt.Sequence([pt.Digits(individual_digits=True), gpt2])
    return gpt2


class StreamDecoder:
    """Turns token ids into text one at a time, holding back bytes until they complete a UTF-8 character."""

    def __init__(self, tokenizer: Tokenizer, strip_dummy_space: bool):
        self._tok = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._strip = strip_dummy_space

    def push(self, token_id: int) -> str:
        """Add one token; return the text that became complete (possibly empty)."""
        data = self._tok.token_bytes(token_id)
        if self._strip and token_id not in self._tok.special_ids:
            self._strip = False
            if data.startswith(b" "):
                data = data[1:]
        return self._utf8.decode(data)

    def flush(self) -> str:
        """End of stream: return any held-back bytes (an incomplete character becomes U+FFFD)."""
        return self._utf8.decode(b"", final=True)


class Tokenizer:
    """Text <-> token ids. Subclasses set the vocabulary bytes and implement `_encode_text`."""

    vocab_size: int
    bos_id: int | None
    eos_ids: list[int]
    add_bos: bool
    chat_template: str | None
    special_tokens: dict[str, int]  # text -> id of every token matched whole inside a prompt
    special_ids: frozenset[int]
    dummy_prefix: bool  # SentencePiece style: a space is prepended when encoding, dropped when decoding
    _bytes: list[bytes]
    _special_re: re.Pattern[str] | None

    def _init_common(
        self,
        token_bytes: list[bytes],
        special_ids: set[int],
        bos_id: int | None,
        eos_ids: list[int],
        add_bos: bool,
        chat_template: str | None,
        dummy_prefix: bool,
    ) -> None:
        self._bytes = token_bytes
        self.vocab_size = len(token_bytes)
        self.special_ids = frozenset(special_ids)
        self.special_tokens = {}
        for i in sorted(special_ids):
            self.special_tokens.setdefault(token_bytes[i].decode("utf-8", errors="replace"), i)
        alts = sorted(self.special_tokens, key=len, reverse=True)
        self._special_re = re.compile("|".join(re.escape(a) for a in alts)) if alts else None
        self.bos_id = bos_id
        self.eos_ids = eos_ids
        self.add_bos = add_bos
        self.chat_template = chat_template
        self.dummy_prefix = dummy_prefix

    def encode(self, text: str, *, bos: bool | None = None) -> list[int]:
        """Token ids of `text`; special-token texts map to their ids. BOS first if `bos` (None: add_bos)."""
        with_bos = self.add_bos if bos is None else bos
        ids = [self.bos_id] if with_bos and self.bos_id is not None else []
        return ids + self._encode_text(text)

    def _encode_text(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids` (special tokens as their text; invalid UTF-8 as U+FFFD)."""
        stream = self.stream()
        return "".join(stream.push(int(i)) for i in ids) + stream.flush()

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes token `token_id` stands for."""
        if not 0 <= token_id < self.vocab_size:
            raise DllamaError(f"token id {token_id} is outside the vocabulary (size {self.vocab_size})")
        return self._bytes[token_id]

    def token_text(self, token_id: int) -> str:
        """The token's text for display and special-token lookup (a partial character shows as U+FFFD)."""
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    def stream(self, *, at_start: bool = True) -> StreamDecoder:
        """An incremental decoder. `at_start`: the text begins here, so a SentencePiece dummy space is dropped
        from the first piece (as HF does); pass False when continuing a prompt's text."""
        return StreamDecoder(self, self.dummy_prefix and at_start)

    def _split_special(self, text: str) -> list[tuple[str, int | None]]:
        """`text` cut at special-token occurrences (longest match wins): (segment, None) or (text, id)."""
        if self._special_re is None:
            return [(text, None)] if text else []
        out: list[tuple[str, int | None]] = []
        pos = 0
        for m in self._special_re.finditer(text):
            if m.start() > pos:
                out.append((text[pos : m.start()], None))
            out.append((m.group(), self.special_tokens[m.group()]))
            pos = m.end()
        if pos < len(text):
            out.append((text[pos:], None))
        return out


def _eos_list(meta: dict[str, Any], tokens: list[str], specials: set[int]) -> list[int]:
    """The declared EOS first, then the declared EOT/EOM and other end-of-turn specials, no duplicates."""
    by_text = {tokens[i]: i for i in specials}
    keys = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
    out: list[int] = []
    for i in [*(meta.get(k) for k in keys), *(by_text.get(t) for t in END_TEXTS)]:
        if i is not None and i not in out:
            out.append(i)
    return out


class GGUFBPETokenizer(Tokenizer):
    """GGUF `gpt2` vocabularies (byte-level BPE) encoded with the tokenizers library."""

    def __init__(self, meta: dict[str, Any]):
        from tokenizers import AddedToken, decoders, models
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import pre_tokenizers as pt

        tokens: list[str] = meta["tokenizer.ggml.tokens"]
        types: list[int] = meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
        if len(types) != len(tokens):
            raise DllamaError(f"GGUF tokenizer: {len(tokens)} tokens but {len(types)} token types")
        merges = []
        for m in meta.get("tokenizer.ggml.merges") or []:
            parts = m.split(" ")
            if len(parts) != 2:
                raise DllamaError(f"GGUF tokenizer: malformed merge {m!r} (expected two tokens)")
            merges.append((parts[0], parts[1]))
        pre = str(meta.get("tokenizer.ggml.pre", "default"))
        style = PRE_STYLES.get(pre, "gpt2")
        try:
            model = models.BPE(
                vocab={t: i for i, t in enumerate(tokens)}, merges=merges, ignore_merges=style == "llama3"
            )
        except Exception as e:
            raise DllamaError(f"GGUF tokenizer: invalid BPE vocabulary or merges ({_one_line(e)})") from None
        hf = HFTokenizer(model)
        byte_level = pt.ByteLevel(add_prefix_space=False, use_regex=False)
        hf.pre_tokenizer = pt.Sequence([_pre_tokenizer(style), byte_level])
        hf.decoder = decoders.ByteLevel()
        specials = {i for i, t in enumerate(types) if t in SPECIAL_TYPES}
        hf.add_special_tokens(
            [AddedToken(tokens[i], special=True, normalized=False) for i in sorted(specials)]
        )
        self._hf = hf

        byte_of = {c: b for b, c in enumerate(gpt2_byte_table())}
        token_bytes = [
            t.encode()
            if i in specials
            else b"".join(bytes([byte_of[c]]) if c in byte_of else c.encode() for c in t)
            for i, t in enumerate(tokens)
        ]
        self._init_common(
            token_bytes,
            specials,
            meta.get("tokenizer.ggml.bos_token_id"),
            _eos_list(meta, tokens, specials),
            bool(meta.get("tokenizer.ggml.add_bos_token", style == "llama3")),
            meta.get("tokenizer.chat_template"),
            dummy_prefix=False,
        )

    def _encode_text(self, text: str) -> list[int]:
        return self._hf.encode(text, add_special_tokens=False).ids


class GGUFSentencePieceTokenizer(Tokenizer):
    """GGUF `llama` vocabularies: a SentencePiece BPE model rebuilt from the GGUF pieces, scores and types."""

    def __init__(self, meta: dict[str, Any]):
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2 as pb

        tokens: list[str] = meta["tokenizer.ggml.tokens"]
        n = len(tokens)
        scores: list[float] = meta.get("tokenizer.ggml.scores") or [0.0] * n
        types: list[int] = meta.get("tokenizer.ggml.token_type") or [NORMAL] * n
        if len(scores) != n or len(types) != n:
            raise DllamaError(f"GGUF tokenizer: {n} tokens but {len(scores)} scores and {len(types)} types")
        dummy = bool(meta.get("tokenizer.ggml.add_space_prefix", True))

        proto = pb.ModelProto()
        try:
            for text, score, kind in zip(tokens, scores, types, strict=True):
                piece = proto.pieces.add()
                piece.piece, piece.score, piece.type = text, score, kind
        except (ValueError, TypeError) as e:  # a token type or score protobuf cannot hold
            raise DllamaError(f"GGUF tokenizer: invalid SentencePiece piece ({_one_line(e)})") from None
        unk = [i for i, t in enumerate(types) if t == UNKNOWN]
        ts = proto.trainer_spec
        ts.model_type = pb.TrainerSpec.BPE
        ts.vocab_size = n
        ts.byte_fallback = BYTE in types
        ts.split_digits = True
        ts.unk_id = unk[0] if unk else 0
        ts.bos_id = ts.eos_id = ts.pad_id = -1
        ns = proto.normalizer_spec
        ns.name = "identity"
        ns.add_dummy_prefix = dummy
        ns.remove_extra_whitespaces = False
        ns.escape_whitespaces = True
        sp = spm.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(proto.SerializeToString())
        except Exception as e:
            raise DllamaError(
                f"GGUF tokenizer: cannot build a SentencePiece model ({_one_line(e)})"
            ) from None
        self._sp = sp

        token_bytes = []
        for text, kind in zip(tokens, types, strict=True):
            if kind == BYTE and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text):
                token_bytes.append(bytes([int(text[3:5], 16)]))
            elif kind in (NORMAL, USER_DEFINED):
                token_bytes.append(text.replace("\u2581", " ").encode())
            else:
                token_bytes.append(text.encode())
        specials = {i for i, t in enumerate(types) if t in SPECIAL_TYPES}
        self._init_common(
            token_bytes,
            specials,
            meta.get("tokenizer.ggml.bos_token_id"),
            _eos_list(meta, tokens, specials),
            bool(meta.get("tokenizer.ggml.add_bos_token", True)),
            meta.get("tokenizer.chat_template"),
            dummy,
        )

    def _encode_text(self, text: str) -> list[int]:
        ids: list[int] = []
        for segment, special in self._split_special(text):
            if special is not None:
                ids.append(special)
            else:
                ids.extend(self._sp.EncodeAsIds(segment))
        return ids


def _merge(symbols: list[bytes], lookup: dict[bytes, int], scores: Sequence[float]) -> list[bytes]:
    """Greedy BPE: repeatedly join the adjacent pair whose joined bytes form the highest-scoring token
    (leftmost on ties) until no adjacent pair forms a token."""
    n = len(symbols)
    if n < 2:
        return symbols
    parts: list[bytes | None] = list(symbols)
    nxt = list(range(1, n + 1))
    nxt[-1] = -1
    prv = list(range(-1, n - 1))
    heap: list[tuple[float, int, int]] = []

    def offer(i: int) -> None:
        j = nxt[i]
        if j < 0:
            return
        a, b = parts[i], parts[j]
        tid = lookup.get(a + b)
        if tid is not None:
            heapq.heappush(heap, (-scores[tid], i, len(a) + len(b)))

    for i in range(n - 1):
        offer(i)
    while heap:
        _, i, size = heapq.heappop(heap)
        a = parts[i]
        j = nxt[i]
        if a is None or j < 0 or len(a) + len(parts[j]) != size:
            continue  # stale: one side has been merged since this pair was offered
        parts[i] = a + parts[j]
        parts[j] = None
        nxt[i] = nxt[j]
        if nxt[j] >= 0:
            prv[nxt[j]] = i
        if prv[i] >= 0:
            offer(prv[i])
        offer(i)
    return [p for p in parts if p is not None]


def _byte_fallback_start(vocab: Sequence[bytes]) -> int | None:
    """Start of SentencePiece byte fallback: a run of 256 tokens spelling bytes 0x00..0xFF in order while
    some of those bytes are also ordinary pieces (a byte-level vocabulary holds each byte once)."""
    singles = [v for v in vocab if len(v) == 1]
    if len(singles) == len(set(singles)):
        return None
    for i in range(len(vocab) - 255):
        if vocab[i] == b"\x00" and all(vocab[i + k] == bytes([k]) for k in range(256)):
            return i
    return None


def _is_special_text(data: bytes, vocab_set: set[bytes]) -> bool:
    """A bracketed control text like `<|im_start|>` that no merge of two vocabulary entries produces."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    if not _BRACKETED.fullmatch(text):
        return False
    return not any(data[:k] in vocab_set and data[k:] in vocab_set for k in range(1, len(data)))


class TFileTokenizer(Tokenizer):
    """distributed-llama `.t` vocabularies with our own encoder (no "every id >= bos is special" rule).

    Special tokens: bos, the EOS ids, and every bracketed text (`<...>`, no spaces) that is not the
    concatenation of two other vocabulary entries (ordinary BPE tokens always are).
    SentencePiece-style vocabularies (256 byte-fallback tokens besides the ordinary pieces, or no
    single-byte tokens for the UTF-8 continuation bytes) get a dummy-prefix space per text segment and no
    pre-split. Byte-level ones are pre-split by a regex chosen from what the vocabulary holds: tokens
    gluing a punctuation mark to letters mean a Llama-3-style split (1-3 digit numbers if multi-digit
    tokens exist, else single digits as Qwen2), otherwise GPT-2's split (digits one by one when no
    multi-digit tokens exist, as SmolLM2/StarCoder). A pre-split piece that is itself a token is taken
    whole (Llama 3's ignore_merges); the rest merge by score, highest first, leftmost on ties.
    """

    def __init__(self, tf: TFile):
        vocab = list(tf.vocab)
        n = len(vocab)
        if len(tf.scores) != n:
            raise DllamaError(f".t tokenizer: {n} vocabulary entries but {len(tf.scores)} scores")
        for i in [tf.bos_id, *tf.eos_ids]:
            if i is not None and i >= 0 and not i < n:
                raise DllamaError(f".t tokenizer: bos/eos id {i} is outside the vocabulary (size {n})")
        vocab_set = set(vocab)
        specials = {i for i in [tf.bos_id, *tf.eos_ids] if i is not None and i >= 0}
        specials |= {i for i, v in enumerate(vocab) if v.startswith(b"<") and _is_special_text(v, vocab_set)}
        fallback = _byte_fallback_start(vocab)
        byte_level = all(bytes([b]) in vocab_set for b in range(0x80, 0xC0))  # lone continuation bytes
        spm_style = fallback is not None or not byte_level
        self._fallback = fallback
        self._scores = list(tf.scores)
        lookup: dict[bytes, int] = {}
        fallback_ids = range(fallback, fallback + 256) if fallback is not None else range(0)
        for i, v in enumerate(vocab):
            if i in specials or i in fallback_ids or not v:
                continue
            j = lookup.get(v)
            if j is None or self._scores[i] > self._scores[j]:
                lookup[v] = i
        self._lookup = lookup
        self._pre = None if spm_style else _pre_tokenizer(self._split_style(lookup))
        bos = tf.bos_id if tf.bos_id is not None and tf.bos_id >= 0 else None
        self._init_common(vocab, specials, bos, list(tf.eos_ids), tf.add_bos, tf.chat_template, spm_style)

    @staticmethod
    def _split_style(lookup: dict[bytes, int]) -> str:
        glued = re.compile(rb"[!-/:-@\[-`{-~][A-Za-z]{2,}")
        digits = re.compile(rb" ?[0-9]{2,}")
        has_glued = any(glued.fullmatch(v) and not v.startswith(b"'") for v in lookup)
        has_numbers = any(digits.fullmatch(v) for v in lookup)
        if has_glued:
            return "llama3" if has_numbers else "qwen2"
        return "gpt2" if has_numbers else "digits+gpt2"

    def _encode_text(self, text: str) -> list[int]:
        ids: list[int] = []
        for segment, special in self._split_special(text):
            if special is not None:
                ids.append(special)
            elif self._pre is None:
                ids.extend(self._encode_spm(" " + segment if self.dummy_prefix else segment))
            else:
                for piece, _ in self._pre.pre_tokenize_str(segment):
                    ids.extend(self._encode_bytes(piece.encode()))
        return ids

    def _encode_bytes(self, data: bytes) -> list[int]:
        whole = self._lookup.get(data)
        if whole is not None:
            return [whole]
        symbols = [bytes([b]) for b in data if bytes([b]) in self._lookup]  # absent bytes dropped, as HF
        return [self._lookup[p] for p in _merge(symbols, self._lookup, self._scores)]

    def _encode_spm(self, text: str) -> list[int]:
        parts = _merge([c.encode() for c in text], self._lookup, self._scores)
        ids: list[int] = []
        for p in parts:
            tid = self._lookup.get(p)
            if tid is not None:
                ids.append(tid)
            elif self._fallback is not None:
                ids.extend(self._fallback + b for b in p)
            else:
                raise DllamaError(
                    f".t tokenizer: cannot encode {p.decode(errors='replace')!r} (not in the "
                    "vocabulary and no byte fallback)"
                )
        return ids


GGUF_TOKEN_IDS = (
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.eot_token_id",
    "tokenizer.ggml.eom_token_id",
)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_gguf_tokenizer(meta: dict[str, Any], where: str) -> None:
    """Refuse GGUF tokenizer metadata of the wrong types or sizes (one line naming `where` and the key)
    before a tokenizer is built from it."""
    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise DllamaError(f"{where}: tokenizer.ggml.tokens is not a non-empty list of strings")
    n = len(tokens)
    per_token = (
        ("tokenizer.ggml.token_type", _is_int),
        ("tokenizer.ggml.scores", lambda v: _is_int(v) or isinstance(v, float)),
    )
    for key, ok in per_token:
        values = meta.get(key)
        if values is not None and (
            not isinstance(values, list) or len(values) != n or not all(map(ok, values))
        ):
            size = len(values) if isinstance(values, list) else "not a list"
            raise DllamaError(f"{where}: {key} must be a list of {n} numbers, one per token (found {size})")
    merges = meta.get("tokenizer.ggml.merges")
    if merges is not None and (not isinstance(merges, list) or not all(isinstance(m, str) for m in merges)):
        raise DllamaError(f"{where}: tokenizer.ggml.merges is not a list of strings")
    for key in GGUF_TOKEN_IDS:
        tid = meta.get(key)
        if tid is not None and not (_is_int(tid) and 0 <= tid < n):
            raise DllamaError(f"{where}: {key} {tid!r} is not a token id of the {n}-token vocabulary")
    for key in ("tokenizer.ggml.pre", "tokenizer.chat_template"):
        if meta.get(key) is not None and not isinstance(meta[key], str):
            raise DllamaError(f"{where}: {key} is not a string")


def tokenizer_from_gguf(metadata: dict[str, Any], where: str = "the GGUF file") -> Tokenizer:
    """The tokenizer described by a GGUF file's metadata (as returned by engine.gguf_file.read_gguf);
    `where` names the file in errors."""
    model = metadata.get("tokenizer.ggml.model")
    if "tokenizer.ggml.tokens" not in metadata:
        raise DllamaError(f"{where} has no tokenizer (tokenizer.ggml.tokens is missing)")
    if model not in ("gpt2", "llama"):
        raise DllamaError(f"{where}: GGUF tokenizer model {model!r} is not supported (gpt2 and llama are)")
    check_gguf_tokenizer(metadata, where)
    try:
        return GGUFBPETokenizer(metadata) if model == "gpt2" else GGUFSentencePieceTokenizer(metadata)
    except DllamaError as e:
        raise DllamaError(f"{where}: {e}") from None


def tokenizer_from_tfile(tf: TFile) -> Tokenizer:
    """The tokenizer of a distributed-llama `.t` file."""
    return TFileTokenizer(tf)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer from a `.t` file or a GGUF file (vocabulary-only ones too), told apart by magic;
    a directory, FIFO or device is refused unread, a `.t` file over engine.tfile.MAX_T_BYTES too."""
    p = Path(path)
    with open_regular(p, "expected a .t or GGUF tokenizer") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        from engine.gguf_file import read_gguf

        meta, _, _ = read_gguf(p)
        return tokenizer_from_gguf(meta, str(p))
    tf = read_tfile(p)
    try:
        return tokenizer_from_tfile(tf)
    except DllamaError as e:
        raise DllamaError(f"{p}: {e}") from None
