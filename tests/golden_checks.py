"""Checks of a Runner on the embedded SmolLM2 against ../shared/reference, shared by every backend's tests."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from engine.cli import log_softmax_at
from engine.runner import Runner
from engine.tokenizer import tokenizer_from_gguf
from engine.weights import Model


def check_last_logits(golden: tuple[dict, dict], runner: Runner) -> None:
    """f32 activations: within 1e-3 of every case, same top-1. Q80 activations move logits by design: no
    further on average than llama.cpp's Q8 ones (0.25, notes/models.md), top-1 where the margin is wide."""
    meta, npz = golden
    errs, top1 = [], []
    for case in meta["cases"]:
        i = case["case"]
        got = runner.forward(list(npz[f"case{i}_prompt_ids"]), 0)
        want = npz[f"case{i}_last_logits"]
        errs.append(np.abs(got - want))
        top1.append(int(np.argmax(got)) == int(np.argmax(want)))
    if runner.act == "f32":
        assert max(e.max() for e in errs) <= 1e-3
        assert all(top1)
    else:
        assert np.concatenate(errs).mean() <= 0.25
        wide = [case["greedy_margins"][0] >= 0.5 for case in meta["cases"]]
        assert all(ok for ok, w in zip(top1, wide, strict=True) if w)


def check_perplexity(golden: tuple[dict, dict], runner: Runner, model: Model, shared: Path) -> None:
    """Perplexity of ppl_text.txt (no BOS, every next token scored): within 0.1% (f32) or 2% (Q80)."""
    want = golden[0]["perplexity"]
    ids = tokenizer_from_gguf(model.metadata).encode((shared / "ppl_text.txt").read_text())
    assert len(ids) - 1 == want["n_scored"]
    logits = runner.forward(ids, 0, "all")
    ppl = math.exp(-float(log_softmax_at(logits[:-1], np.asarray(ids[1:])).mean()))
    tol = 0.001 if runner.act == "f32" else 0.02
    assert abs(ppl - want["ppl"]) / want["ppl"] <= tol
