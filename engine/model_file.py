"""Open a model of any supported format: a GGUF or `.m` file, chosen by its first bytes rather than its name,
or a Hugging Face checkpoint folder (one with a config.json)."""

from __future__ import annotations

import struct
from pathlib import Path

from engine.errors import DllamaError
from engine.files import open_regular
from engine.gguf_file import GGUF_MAGIC, load_gguf
from engine.hf_file import is_checkpoint, open_hf
from engine.mfile import M_MAGIC, OLD_M_MAGICS, read_m
from engine.tfile import T_MAGIC, T_MAGIC_LEGACY
from engine.weights import Model

EXPECTED = "expected a GGUF file or a distributed-llama .m model"


def open_model(path: str | Path) -> Model:
    """Load a GGUF or `.m` model or a Hugging Face checkpoint folder; a missing, empty, foreign or
    non-regular file (a FIFO, device or a folder without config.json) raises a DllamaError saying so."""
    p = Path(path)
    if is_checkpoint(p):
        return open_hf(p)
    if p.is_dir():
        raise DllamaError(
            f"{p}: is a directory without a config.json ({EXPECTED}, or a Hugging Face checkpoint)"
        )
    with open_regular(p, EXPECTED) as f:
        head = f.read(4)
    if not head:
        raise DllamaError(f"{p}: empty file ({EXPECTED})")
    if head == GGUF_MAGIC:
        return load_gguf(p)
    if len(head) == 4:
        (magic,) = struct.unpack("<i", head)
        if magic == M_MAGIC or magic in OLD_M_MAGICS:
            return read_m(p)
        if magic in (T_MAGIC, T_MAGIC_LEGACY):
            raise DllamaError(f"{p}: this is a distributed-llama tokenizer (.t), not a model ({EXPECTED})")
    raise DllamaError(f"{p}: unknown file format (first bytes {head.hex()}; {EXPECTED})")
