"""The embedded SmolLM2-135M (3 KV heads) on 3 nodes and on 2 (an uneven 2 + 1 KV-head split) against the
golden HF outputs: last-prompt logits and the greedy ids of safe_prefix_f32, with f32 sync."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cpu_fallback.backend import CpuBackend
from engine.generate import generate
from engine.model_file import open_model
from engine.runner import Runner
from engine.sampler import Sampler
from engine.tokenizer import tokenizer_from_gguf


@pytest.mark.slow
@pytest.mark.parametrize("n_nodes", [3, 2])
def test_smollm2_cluster_matches_golden(pool, shared, smollm2_path, n_nodes):
    meta = json.loads((shared / "smollm2_golden.json").read_text())
    npz = np.load(shared / "smollm2_golden.npz")
    model = open_model(smollm2_path)
    tok = tokenizer_from_gguf(model.metadata)
    workers = pool.get(n_nodes - 1)
    marks = [w.mark() for w in workers]
    r = Runner(
        model,
        CpuBackend(1),
        "f32",
        max_seq_len=128,
        workers=[w.address for w in workers],
        log=lambda line: None,
    )
    try:
        for k, (w, m) in enumerate(zip(workers, marks, strict=True), 1):
            # every worker holds 1 of the 3 KV heads; the root holds the rest (2 of them on 2 nodes)
            assert w.wait_for(rf"Node {k} of {n_nodes}: .* (\d) of 3 KV heads", m).group(1) == "1"
        for case in meta["cases"]:
            i, n = case["case"], case["safe_prefix_f32"]
            prompt = list(npz[f"case{i}_prompt_ids"])
            got = r.forward(prompt, 0)
            assert np.abs(got - npz[f"case{i}_last_logits"]).max() <= 1e-3
            if n:
                events = generate(r, tok, prompt, n, Sampler(tok.vocab_size, 0.0))
                assert [e.token for e in events if e.kind == "token"] == list(npz[f"case{i}_greedy_ids"][:n])
        in_session = [w.rss() for w in workers]
    finally:
        r.close()
    assert r.slice.n_kv_heads == (1 if n_nodes == 3 else 2)
    for w, m, before in zip(workers, marks, in_session, strict=True):
        received = float(w.wait_for(r"Received \d+ tensors, ([\d.]+) MB", m).group(1)) * 1e6
        w.wait_for("Waiting for a root", m)
        assert before - w.rss() > 0.8 * received  # the slice was freed for the next root
