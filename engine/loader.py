"""From command-line choices to a ready Runner: model file, tokenizer, backend, graph."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from engine.backend import Backend
from engine.catalog import resolve_model, tokenizer_for
from engine.errors import DllamaError
from engine.graph import ACT_TYPES
from engine.model_file import open_model
from engine.runner import Runner
from engine.tokenizer import Tokenizer, load_tokenizer, tokenizer_from_gguf
from engine.weights import Model

BACKENDS = ("cpu", "vulkan", "auto")


def make_backend(name: str, n_threads: int | None, gpu_index: int | None = None) -> Backend:
    """The backend a user asked for: cpu; vulkan (device `gpu_index`, default the first); or auto: device
    `gpu_index`, else the first Vulkan device that is not a CPU implementation, else the CPU backend."""
    if name not in BACKENDS:
        raise DllamaError(f"unknown backend {name!r}: choose one of {', '.join(BACKENDS)}")
    if n_threads is not None and not 1 <= n_threads <= (os.cpu_count() or 1):
        raise DllamaError(f"--nthreads {n_threads} is out of range: this machine has {os.cpu_count()} cores")
    if gpu_index is not None and gpu_index < 0:
        raise DllamaError(f"--gpu-index {gpu_index} is invalid: Vulkan devices are numbered 0, 1, ...")
    if gpu_index is not None and name == "cpu":
        raise DllamaError(f"--gpu-index {gpu_index} selects a Vulkan device: add --backend vulkan (or auto)")
    if name != "cpu":
        from shaders.backend import VulkanBackend, available_devices, first_gpu

        if name == "vulkan" or gpu_index is not None:
            return VulkanBackend(gpu_index)
        devices = available_devices()
        gpu = first_gpu(devices)
        if gpu is not None:
            print(f"🌋 --backend auto chose {gpu.describe()}")
            return VulkanBackend(gpu.index)
        found = ", ".join(d.name for d in devices)
        why = f"only CPU implementations of Vulkan ({found})" if devices else "no Vulkan device"
        print(f"🌋 --backend auto found {why}: using the CPU backend")
    from cpu_fallback.backend import CpuBackend

    return CpuBackend(n_threads)


def padding_rows_allowed(model_vocab: int) -> int:
    """How many more rows a model may have than its tokenizer has tokens: at most 1% of its vocabulary and
    at most 1024 (distributed-llama's Qwen3 tokenizers have 151669 tokens for 151936 rows)."""
    return min(model_vocab // 100, 1024)


def check_vocab_sizes(tokens: int, rows: int, tokenizer_name: str, model_name: str) -> None:
    """Refuse a tokenizer that does not belong to the model by its size; warn (one line on stderr) when
    the model only has a few padding rows more, which are never sampled (the sampler sees `tokens` ids)."""
    if tokens > rows:
        raise DllamaError(
            f"the tokenizer {tokenizer_name} has {tokens} tokens but the model {model_name} only {rows}: "
            "they do not belong together"
        )
    if rows - tokens > padding_rows_allowed(rows):
        raise DllamaError(
            f"the tokenizer {tokenizer_name} has {tokens} tokens but the model {model_name} {rows}: they do "
            f"not belong together (at most {padding_rows_allowed(rows)} padding rows are accepted)"
        )
    if tokens < rows:
        print(
            f"⚠️ the tokenizer {tokenizer_name} has {tokens} tokens, the model {model_name} {rows} rows: "
            f"the last {rows - tokens} are padding and never sampled",
            file=sys.stderr,
        )


def _check_same_tokens(tokenizer: Tokenizer, tokenizer_path: str, model: Model, path: Path) -> None:
    """A GGUF model carries its own tokenizer: refuse a --tokenizer whose tokens differ from it (another
    model's tokenizer of the same size gives garbage). A model tokenizer that cannot be built is not
    compared: the user's file then replaces it."""
    try:
        own = tokenizer_from_gguf(model.metadata, str(path))
    except DllamaError:
        return
    n = min(own.vocab_size, tokenizer.vocab_size)
    first = next((i for i in range(n) if own.token_bytes(i) != tokenizer.token_bytes(i)), None)
    if first is None and own.vocab_size == tokenizer.vocab_size:
        return
    where = f"token {first} differs" if first is not None else "the sizes differ"
    raise DllamaError(
        f"{tokenizer_path}: its {tokenizer.vocab_size} tokens are not those of the tokenizer inside "
        f"{path.name} ({own.vocab_size} tokens; {where}): leave out --tokenizer to use the model's own"
    )


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
    workers: Sequence[str] = (),
    net_timeout: float | None = None,
    gpu_index: int | None = None,
    split: Sequence[float] | str | None = None,
    kv_type: str = "f32",
    n_slots: int = 1,
) -> Loaded:
    """Open the model (a file or a catalogue name; the embedded SmolLM2 when none is given) and its
    tokenizer, and compile the graph; with `workers` (HOST:PORT) this node becomes the root of a cluster and
    streams them their slices, split by `split` (default "auto": by every node's measured speed); the KV cache
    holds `n_slots` sequences."""
    if act not in ACT_TYPES:
        raise DllamaError(f"unknown --buffer-float-type {act!r}: choose one of {', '.join(ACT_TYPES)}")
    if max_seq_len is not None and max_seq_len < 1:
        raise DllamaError(f"--max-seq-len must be at least 1 (got {max_seq_len})")
    be = make_backend(backend, n_threads, gpu_index)
    path = resolve_model(model_path)
    model = open_model(path)
    if tokenizer_path:
        tokenizer = load_tokenizer(tokenizer_path)
        if model.kind in ("gguf", "hf") and "tokenizer.ggml.tokens" in model.metadata:
            _check_same_tokens(tokenizer, tokenizer_path, model, path)
    elif model.kind == "hf" and "tokenizer.ggml.tokens" not in model.metadata:
        raise DllamaError(f"{path} has no tokenizer.json: pass --tokenizer FILE (.t or .gguf)")
    elif model.kind in ("gguf", "hf"):  # a Hugging Face folder: its tokenizer.json as GGUF metadata
        tokenizer = tokenizer_from_gguf(model.metadata, str(path))
    elif (pulled := tokenizer_for(path)) is not None:  # a pulled .m: its .t lies beside it
        tokenizer = load_tokenizer(str(pulled))
    else:
        raise DllamaError(f"{path} carries no tokenizer: pass --tokenizer FILE (.t or .gguf)")
    check_vocab_sizes(tokenizer.vocab_size, model.config.vocab_size, tokenizer_path or path.name, path.name)
    split = split if split is not None or not workers else "auto"
    runner = Runner(
        model,
        be,
        act,
        max_seq_len,
        workers=workers,
        net_timeout=net_timeout,
        split=split,
        kv_type=kv_type,
        n_slots=n_slots,
    )
    return Loaded(model, tokenizer, runner)
