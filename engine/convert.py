"""Model conversion: a GGUF file or a Hugging Face checkpoint folder to a distributed-llama `.m` (+ `.t`), so
the C++ program can run the same model, or to a GGUF.

Tensors are built (a view of the source file, a permuted copy, an expert stack), converted and written one at
a time, and the file pages of those already written are dropped, so a conversion holds about one layer's
largest tensors however large the model is.
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np

from engine.arch import get_arch
from engine.atomic_file import all_or_none, check_output
from engine.config import RopeScaling
from engine.errors import DllamaError
from engine.files import release_file_pages
from engine.gguf_file import load_gguf
from engine.gguf_writer import GGUF_WEIGHT_TYPES, llama31_divisors, write_gguf
from engine.hf_file import interleave_order, is_checkpoint, read_checkpoint
from engine.mfile import check_writable, write_m
from engine.tfile import tfile_from_gguf, write_tfile
from engine.weights import Model, Weight

M_WEIGHT_TYPES = ("f32", "f16", "q40", "q80")
STANDARD_LLAMA31 = (1.0, 4.0, 8192)  # low_freq_factor, high_freq_factor, original context of Llama 3.1/3.2
INT32_MAX = 2**31 - 1  # .m header values are int32
Builder = Callable[[], Weight]


class LazyWeights(Mapping[str, Weight]):
    """Weights built when a writer asks for them: the last KEEP are kept (a `.m` writer interleaves a
    layer's three expert stacks), older ones forgotten and their file pages dropped. `aliases` name a
    tensor that is another (a tied classifier), which then is the same object."""

    KEEP = 3

    def __init__(self, builders: dict[str, Builder], aliases: dict[str, str]):
        self._builders, self._aliases = builders, aliases
        self._recent: OrderedDict[str, Weight] = OrderedDict()

    def __getitem__(self, name: str) -> Weight:
        key = self._aliases.get(name, name)
        w = self._recent.get(key)
        if w is not None:
            self._recent.move_to_end(key)
            return w
        w = self._recent[key] = self._builders[key]()
        if len(self._recent) > self.KEEP:
            release_file_pages(self._recent.popitem(last=False)[1].data)
        return w

    def __contains__(self, name: object) -> bool:
        return name in self._builders or name in self._aliases

    def __iter__(self) -> Iterator[str]:
        return iter([*self._builders, *self._aliases])

    def __len__(self) -> int:
        return len(self._builders) + len(self._aliases)


def _interleaved(build: Builder, n_heads: int) -> Builder:
    """A q/k matrix with its rotate-half rows put in interleaved order (a copy)."""

    def permuted() -> Weight:
        w = build()
        data = w.data[interleave_order(w.rows, n_heads)]
        release_file_pages(w.data)
        return dataclasses.replace(w, data=data)

    return permuted


def open_source(src: str | Path, interleave: bool) -> Model:
    """The model to convert (a Hugging Face checkpoint folder or a GGUF file), its tensors built on demand.
    With `interleave`, an interleaving architecture's rotate-half q/k rows (HF's) are permuted into
    interleaved pairs and the config says so."""
    if is_checkpoint(src):
        ck = read_checkpoint(src)
        cfg, builders, tied = ck.config, dict(ck.builders), ck.tied
        path, size, kind, meta = str(src), ck.file_size, "hf", ck.metadata
    else:
        g = load_gguf(src)
        cfg, tied, path, size, kind, meta = g.config, g.tied, g.path, g.file_size, "gguf", g.metadata
        builders = {n: (lambda w=w: w) for n, w in g.weights.items() if not (tied and n == "output.weight")}
    arch = get_arch(cfg.arch)
    if interleave and cfg.rope_neox and not arch.neox:
        for name, spec in arch.table(cfg):
            if spec.rope_heads and name in builders:
                heads = cfg.n_heads if spec.rope_heads == "q" else cfg.n_kv_heads
                builders[name] = _interleaved(builders[name], heads)
        cfg = dataclasses.replace(cfg, rope_neox=False)
    aliases = {"output.weight": "token_embd.weight"} if tied else {}
    return Model(cfg, LazyWeights(builders, aliases), path, size, kind, meta)


def rope_scaling_from_freqs(
    divisors: np.ndarray, head_dim: int, theta: float, orig: int | None = None
) -> RopeScaling | None:
    """Recover Llama 3.1 scaling parameters from a rope_freqs tensor; None when it scales nothing.

    Only the ratios orig/low and orig/high are determined by the tensor, so `orig` (default 8192) is kept and
    low/high follow; the result must reproduce the tensor and be integral (the .m header stores ints).
    """
    d = np.asarray(divisors, dtype=np.float64).reshape(-1)
    if d.shape != (head_dim // 2,):
        raise DllamaError(f"rope_freqs.weight has {d.size} values, head_dim {head_dim} needs {head_dim // 2}")
    if np.allclose(d, 1.0, rtol=0, atol=1e-6):
        return None
    factor = float(d.max())
    if abs(factor - round(factor)) < 1e-4 * factor:
        factor = float(round(factor))
    orig = orig or STANDARD_LLAMA31[2]
    candidates = [(STANDARD_LLAMA31[0], STANDARD_LLAMA31[1])]
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    mid = (d > 1 + 1e-5) & (d < factor * (1 - 1e-5))
    if mid.sum() >= 2 and factor > 1:
        s = (1.0 / d[mid] - 1.0 / factor) / (1.0 - 1.0 / factor)  # s = a * freq + b, linear in freq
        a, b = np.polyfit(freqs[mid], s, 1)
        if a > 0:
            span = orig / (2 * math.pi * a)
            low = -b * span
            candidates.append((float(round(low)), float(round(low + span))))
    for low, high in candidates:
        if not 0 < low < high:
            continue
        rs = RopeScaling(factor, low, high, int(orig))
        if np.allclose(llama31_divisors(head_dim, theta, rs), d, rtol=1e-4, atol=1e-6):
            return rs
    raise DllamaError(
        "rope_freqs.weight does not follow the Llama 3.1 frequency-scaling rule with integer parameters "
        "(a .m file cannot express it)"
    )


def convert(
    src: str | Path,
    out: str | Path,
    wtype: str,
    out_t: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> None:
    """Convert a GGUF file or a Hugging Face checkpoint folder: to a GGUF when `out` ends in .gguf (its
    tokenizer inside), else to a `.m` (and the `.t` `out_t`)."""
    if str(out).endswith(".gguf"):
        if out_t is not None:
            raise DllamaError(
                f"{out_t}: a .t goes with a .m output; the GGUF {out} carries its own tokenizer"
            )
        convert_to_gguf(src, out, wtype, log)
    else:
        convert_gguf(src, out, wtype, out_t, log)


def convert_to_gguf(src: str | Path, out: str | Path, wtype: str, log: Callable[[str], None] = print) -> None:
    """Write a GGUF file or a Hugging Face checkpoint folder as a GGUF with matrices in `wtype`."""
    if wtype not in GGUF_WEIGHT_TYPES:
        raise DllamaError(f"weight type {wtype!r} is not one of {', '.join(GGUF_WEIGHT_TYPES)} (GGUF types)")
    if Path(src).resolve() == check_output(out):
        raise DllamaError(f"{src} is both the source and the output: give another output name")
    model = open_source(src, interleave=False)  # the GGUF writer interleaves q/k rows as it streams them
    write_gguf(out, model, wtype, log)
    log(f"wrote {out}")


def convert_gguf(
    src: str | Path,
    out_m: str | Path,
    wtype: str,
    out_t: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> None:
    """Convert a GGUF or a Hugging Face checkpoint folder (llama, qwen3, qwen3moe) to a `.m` model with
    matrices in `wtype` and, optionally, its `.t` tokenizer.

    Both files share one vocabulary order that moves special tokens behind the regular ones (spec 3.3).
    Both outputs are checked before any work and land together: a failure leaves neither written.
    """
    if wtype not in M_WEIGHT_TYPES:
        raise DllamaError(f"weight type {wtype!r} is not one of {', '.join(M_WEIGHT_TYPES)} (.m types)")
    targets = [check_output(out_m)] + ([check_output(out_t)] if out_t is not None else [])
    if len(targets) == 2 and targets[0] == targets[1]:
        raise DllamaError(f"the .m and the .t outputs are the same file {out_m}: give two names")
    if Path(src).resolve() in targets:
        raise DllamaError(f"{src} is both the source and an output: give another output name")
    model = open_source(src, interleave=True)
    check_writable(model)
    cfg = model.config
    if wtype == "q40" and model.kind == "gguf" and any(w.dtype == "q41" for w in model.weights.values()):
        log(
            "warning: re-quantizing Q4_1 weights to Q4_0 is lossy and can ruin a small model "
            "(SmolLM2-135M loses its answers); prefer q80 or f32"
        )
    scaling = cfg.rope_scaling
    freqs = model.weights["rope_freqs.weight"] if "rope_freqs.weight" in model.weights else None
    if scaling is None and freqs is not None:
        orig = model.metadata.get("llama.rope.scaling.original_context_length")
        try:
            scaling = rope_scaling_from_freqs(freqs.data, cfg.head_dim, cfg.rope_theta, orig)
        except DllamaError as e:
            raise DllamaError(f"{src}: {e}") from None
        if scaling is not None:
            log(
                f"rope scaling recovered from rope_freqs.weight: factor {scaling.factor:g}, "
                f"low {scaling.low_freq_factor:g}, high {scaling.high_freq_factor:g}, "
                f"original context {scaling.orig_max_seq_len}"
            )
    cfg = dataclasses.replace(cfg, rope_scaling=scaling)
    floats = {"rope_theta": cfg.rope_theta}
    if scaling is not None:
        floats.update(factor=scaling.factor, low=scaling.low_freq_factor, high=scaling.high_freq_factor)
    for name, value in floats.items():
        if not (math.isfinite(value) and abs(value) <= INT32_MAX):
            raise DllamaError(f"{src}: {name} {value:g} cannot be stored in a .m header (an int32)")
        if value != int(value):
            log(f"warning: {name} {value:g} is stored as {int(value)} (.m header values are integers)")
    order = None
    tf = None
    if "tokenizer.ggml.tokens" in model.metadata:
        tf, order = tfile_from_gguf(model.metadata)
        if len(order) > cfg.vocab_size:
            raise DllamaError(f"{src}: the tokenizer has {len(order)} tokens, the model {cfg.vocab_size}")
        order = np.concatenate([order, np.arange(len(order), cfg.vocab_size)])
        if np.array_equal(order, np.arange(cfg.vocab_size)):
            order = None
        else:
            log(f"vocabulary reordered: {int(np.sum(order != np.arange(cfg.vocab_size)))} ids move")
    elif out_t is not None:
        raise DllamaError(f"{src}: the model carries no tokenizer, cannot write {out_t}")
    with all_or_none():
        write_m(out_m, dataclasses.replace(model, config=cfg), wtype, order, log)
        if out_t is not None:
            write_tfile(out_t, tf)
    log(f"wrote {out_m}")
    if out_t is not None:
        log(f"wrote {out_t}")
