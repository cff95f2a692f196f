"""From command-line choices to a ready Runner: model file, tokenizer, backend, graph."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from engine.backend import Backend
from engine.embedded import embedded_model_path
from engine.errors import DllamaError
from engine.graph import ACT_TYPES
from engine.model_file import open_model
from engine.runner import Runner
from engine.tokenizer import Tokenizer, load_tokenizer, tokenizer_from_gguf
from engine.weights import Model

BACKENDS = ("cpu", "vulkan", "auto")


def make_backend(name: str, n_threads: int | None) -> Backend:
    """The backend a user asked for; only the CPU backend exists in this version."""
    if name not in BACKENDS:
        raise DllamaError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")
    if name != "cpu":
        raise DllamaError(f"the {name} backend is not available in this version of dllama: use --backend cpu")
    if n_threads is not None and not 1 <= n_threads <= (os.cpu_count() or 1):
        raise DllamaError(f"--nthreads {n_threads} is out of range: this machine has {os.cpu_count()} cores")
    from cpu_fallback.backend import CpuBackend

    return CpuBackend(n_threads)


@dataclass
class Loaded:
    model: Model
    tokenizer: Tokenizer
    runner: Runner


def load(
    model_path: str | None,
    tokenizer_path: str | None,
    backend: str = "cpu",
    act: str = "f32",
    n_threads: int | None = None,
    max_seq_len: int | None = None,
) -> Loaded:
    """Open the model (the embedded SmolLM2 when none is given) and its tokenizer, and compile the graph."""
    if act not in ACT_TYPES:
        raise DllamaError(f"unknown --buffer-float-type {act!r}: choose one of {', '.join(ACT_TYPES)}")
    if max_seq_len is not None and max_seq_len < 1:
        raise DllamaError(f"--max-seq-len must be at least 1 (got {max_seq_len})")
    be = make_backend(backend, n_threads)
    path = Path(model_path) if model_path else embedded_model_path()
    model = open_model(path)
    if tokenizer_path:
        tokenizer = load_tokenizer(tokenizer_path)
    elif model.kind == "gguf":
        tokenizer = tokenizer_from_gguf(model.metadata)
    else:
        raise DllamaError(f"{path} carries no tokenizer: pass --tokenizer FILE (.t or .gguf)")
    if tokenizer.vocab_size > model.config.vocab_size:
        raise DllamaError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model {path.name} only "
            f"{model.config.vocab_size}: they do not belong together"
        )
    return Loaded(model, tokenizer, Runner(model, be, act, max_seq_len))
