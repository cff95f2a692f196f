"""Clusters of 2-4 nodes on loopback (worker processes) against the 1-node run and the float64 reference."""

from __future__ import annotations

import re

import numpy as np
import pytest
from netutil import TINY8, greedy, ref_forward_nodes
from reference import load_ref_model, ref_forward

from engine.model_file import open_model
from engine.runner import ForwardStats, Runner

TOKENS = [5, 17, 200, 3, 99, 42, 7, 150, 11]  # 9 tokens: batches of 4, 4, 1 with max_batch 4
WTYPES = ["f32", "f16", "bf16", "q80", "q40", "q41"]


def cluster(model, backend, act: str, workers, max_batch: int = 4) -> Runner:
    return Runner(
        model,
        backend,
        act,
        max_seq_len=64,
        max_batch=max_batch,
        workers=[w.address for w in workers],
        log=lambda line: None,
    )


@pytest.mark.parametrize("n_nodes", [2, 3, 4])
@pytest.mark.parametrize("wtype", WTYPES)
def test_f32_sync_matches_one_node(pool, tiny8_paths, backend, wtype, n_nodes):
    model = open_model(tiny8_paths[wtype])
    one = Runner(model, backend, "f32", max_seq_len=64, max_batch=4)
    want_all = one.forward(TOKENS, 0, "all")
    want_tokens = greedy(one, TOKENS, 6)
    workers = pool.get(n_nodes - 1)
    marks = [w.mark() for w in workers]
    r = cluster(model, backend, "f32", workers)
    try:
        got_all = r.forward(TOKENS, 0, "all")  # every row's logits: gathered rows > 1
        got_tokens = greedy(r, TOKENS, 6)  # prefill in "none"/"last" chunks, then 1-row decode steps
    finally:
        r.close()
    for k, (w, m) in enumerate(zip(workers, marks, strict=True), 1):
        w.wait_for(f"Node {k} of {n_nodes}:", m)
    assert np.abs(got_all - want_all).max() <= 1e-4 * max(np.abs(want_all).max(), 1.0)
    assert got_tokens == want_tokens


@pytest.mark.parametrize("n_nodes", [2, 3, 4])
@pytest.mark.parametrize("wtype", ["f32", "q40", "q41"])
def test_q80_sync_within_single_node_tolerance(pool, tiny8_paths, backend, wtype, n_nodes):
    """Every node's partial sums travel as Q80 blocks, so an N-node cluster rounds differently from one node
    (by as much as Q80 itself moves the logits). Against a float64 reference of exactly that scheme the
    cluster stays within test_runner's single-node Q80 bound, far closer than to the 1-node numerics."""
    ref = load_ref_model(tiny8_paths[wtype])
    expected = ref_forward_nodes(ref, TOKENS, n_nodes)
    one_node = ref_forward(ref, TOKENS, q80=True)
    r = cluster(open_model(tiny8_paths[wtype]), backend, "q80", pool.get(n_nodes - 1))
    try:
        got = r.forward(TOKENS, 0, "all")
    finally:
        r.close()
    err = np.abs(got - expected).max()
    assert err <= 2e-3 * np.abs(expected).max()
    assert err < np.abs(one_node - expected).max() / 4


def spec_root_bytes(d: int, n_layers: int, vocab: int, n_nodes: int, act: str) -> tuple[int, int]:
    """Root's payload bytes per decoded token (spec 5.8): it sends (N-1)(8 + 4D + 2Ls) and receives
    (N-1)2Ls + 4V(N-1)/N, with s = 4D (f32) or 34D/32 (Q80) bytes per partial-sum slice."""
    s = 4 * d if act == "f32" else d // 32 * 34
    sent = (n_nodes - 1) * (8 + 4 * d + 2 * n_layers * s)
    return sent, (n_nodes - 1) * 2 * n_layers * s + 4 * vocab * (n_nodes - 1) // n_nodes


def test_formula_reproduces_the_spec_table():
    """The formula as transcribed gives the spec's kB figures (Q80 buffer; 8B: D4096 L32 V128256)."""
    for n, sent_kb, recv_kb in ((2, 288, 523), (4, 864, 1192), (8, 2016, 2342)):
        sent, recv = spec_root_bytes(4096, 32, 128256, n, "q80")
        assert (int(sent / 1024 + 0.5), int(recv / 1024 + 0.5)) == (sent_kb, recv_kb)  # half up


@pytest.mark.parametrize("act", ["f32", "q80"])
@pytest.mark.parametrize("n_nodes", [2, 4])
def test_bytes_per_token_match_the_spec_formula(pool, tiny8_paths, backend, act, n_nodes):
    d, n_layers, vocab, n = TINY8["dim"], TINY8["n_layers"], TINY8["vocab"], 5
    s = 4 * d if act == "f32" else d // 32 * 34
    workers = pool.get(n_nodes - 1)
    marks = [w.mark() for w in workers]
    r = cluster(open_model(tiny8_paths["q40" if act == "q80" else "f32"]), backend, act, workers, max_batch=8)
    prefill, steps = ForwardStats(), [ForwardStats() for _ in range(3)]
    try:
        r.forward(TOKENS[:n], 0, "last", prefill)
        for i, st in enumerate(steps):
            r.forward([7], n + i, "last", st)
    finally:
        r.close()
    sent, recv = spec_root_bytes(d, n_layers, vocab, n_nodes, act)
    assert [(st.sent, st.recv) for st in steps] == [(sent, recv)] * 3
    # a prefill of n rows moves n rows of x and partial sums, and gets one row of logits back
    assert prefill.sent == (n_nodes - 1) * (8 + n * (4 * d + 2 * n_layers * s))
    assert prefill.recv == (n_nodes - 1) * n * 2 * n_layers * s + 4 * vocab * (n_nodes - 1) // n_nodes
    # each worker per token: sends (N-1)2Ls + 4V/N, receives (N-1)2Ls + 4D + 8 (spec 5.8)
    mesh, logits_row = (n_nodes - 1) * 2 * n_layers * s, 4 * vocab // n_nodes
    for w, m in zip(workers, marks, strict=True):
        got = w.wait_for(r"🛑 Stop: (\d+) forward passes; sent (\d+) B, received (\d+) B", m).groups()
        want_sent = n * mesh + logits_row + 3 * (mesh + logits_row)
        want_recv = n * (mesh + 4 * d) + 8 + 3 * (mesh + 4 * d + 8)
        assert tuple(map(int, got)) == (4, want_sent, want_recv)


def test_weight_streaming_reports_progress_and_capabilities(pool, tiny8_paths, backend, monkeypatch):
    import net.root

    monkeypatch.setattr(net.root, "PROGRESS_EVERY", 0.0)  # a progress line after every chunk
    lines: list[str] = []
    (w,) = pool.get(1)
    r = Runner(
        open_model(tiny8_paths["f32"]), backend, "f32", max_seq_len=64, workers=[w.address], log=lines.append
    )
    r.close()
    caps = rf"⭕ Worker 1 at {w.address}: CPU \(numba, 1 thread\) on \S+, [\d.]+ GiB free"
    caps += r", [\d.]+ GB/s measured"
    assert re.fullmatch(caps, lines[0])  # what the worker said of itself in its greeting
    steps = [re.search(r": ([\d.]+) / ([\d.]+) MB of weights sent$", ln) for ln in lines]
    sent = [float(m.group(1)) for m in steps if m]
    total = float(next(m for m in steps if m).group(2))
    assert len(sent) > 10 and sent == sorted(sent) and sent[-1] == total
    assert re.search(rf"worker 1 \({w.address}\): {total} MB of weights sent in [\d.]+ s", "\n".join(lines))


def test_the_kv_cache_type_reaches_the_workers(pool, tiny8_paths, backend):
    """--kv-cache-type f16 on a 3-node cluster: the logits of one f16 node (the workers round their keys and
    values to halves too), not those of f32 caches, and each node's KV bytes halve in the split table. A
    3-way split sums in another order than one node, which flips the odd key or value by one half's unit
    (measured: 8e-5 from the f16 node, 1.1e-3 from the f32 one); workers left at f32 would be ~2/3 of the
    way to the f32 logits, so the f16 node must be over 5 times nearer."""
    model = open_model(tiny8_paths["q40"])
    want = Runner(model, backend, "f32", max_seq_len=64, max_batch=4, kv_type="f16").forward(TOKENS, 0, "all")
    f32 = Runner(model, backend, "f32", max_seq_len=64, max_batch=4).forward(TOKENS, 0, "all")
    workers = [w.address for w in pool.get(2)]
    tables, got = {}, {}
    for kv in ("f16", "f32"):
        r = Runner(
            model, backend, "f32", 64, 4, workers=workers, split=[1, 1, 1], log=lambda line: None, kv_type=kv
        )
        try:
            got[kv] = r.forward(TOKENS, 0, "all")
        finally:
            r.close()
        tables[kv] = [row["bytes"] for row in r.split_table]
    f16_error = np.abs(got["f16"] - want).max()
    assert 5 * f16_error < np.abs(got["f16"] - f32).max()
    kv_f32 = 2 * 2 * 64 * (8 // 3 + 1) * 32 * 4  # node 0: layers x positions x its 3 KV heads x head_dim
    assert tables["f32"][0] - tables["f16"][0] == kv_f32 // 2
