"""The worker's slice cache: a reconnecting root sends only what the worker lacks, damaged entries are
re-sent, another model's entries are never used, the size bound evicts (net/slice_cache.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from netutil import ROOT, TINY8, TOKENS, WorkerProc, root
from tinymodel import write_tiny_gguf

from engine.errors import DllamaError
from engine.model_file import open_model
from engine.runner import Runner
from engine.slicing import node_tensors, plan_slices, slice_weights
from net.slice_cache import SliceCache, model_identity, parse_size, slice_key


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("cache-models")
    a = write_tiny_gguf(d / "a.gguf", wtype="q40", seed=3, **TINY8)
    b = write_tiny_gguf(d / "b.gguf", wtype="q40", seed=4, **TINY8)  # same shapes, other weights
    return open_model(a), open_model(b)


def set_up(model, backend, workers):
    """A root on `workers`: its logits for TOKENS, and the weight bytes it sent and found cached."""
    r = root(model, backend, workers)
    try:
        sent, cached = r.cluster.weight_bytes_sent, r.cluster.weight_bytes_cached
        return r.forward(TOKENS, 0, "all"), sent, cached
    finally:
        r.close()


def test_a_reconnecting_root_sends_only_what_the_worker_lacks(models, backend, tmp_path):
    a, b = models
    want_a = Runner(a, backend, "f32", 64, 4).forward(TOKENS, 0, "all")
    want_b = Runner(b, backend, "f32", 64, 4).forward(TOKENS, 0, "all")
    cache = tmp_path / "cache"
    w = WorkerProc(args=("--cache-dir", str(cache)))
    try:
        got, first, _ = set_up(a, backend, [w])
        assert first > 0 and np.allclose(got, want_a, atol=1e-4)
        got, second, cached = set_up(a, backend, [w])
        assert second <= 0.01 * first and cached == first  # counted, not timed
        assert np.allclose(got, want_a, atol=1e-4)

        # one flipped byte in one cached slice: detected by its digest, re-sent, and the result still right
        (entry,) = [p for p in cache.iterdir() if p.is_dir()]
        victim = entry / "blk.1.ffn_down.weight.bin"
        raw = bytearray(victim.read_bytes())
        raw[len(raw) // 2] ^= 0x10
        victim.write_bytes(raw)
        m = w.mark()
        got, third, _ = set_up(a, backend, [w])
        w.wait_for("cached tensors were incomplete or damaged", m)
        assert third == len(raw) and np.allclose(got, want_a, atol=1e-4)

        # another model of the same shapes: nothing of the first is used
        got, other, cached = set_up(b, backend, [w])
        assert other == first and cached == 0 and np.allclose(got, want_b, atol=1e-4)
    finally:
        w.close()


def test_identity_follows_the_file(models, tmp_path):
    a, b = models
    assert model_identity(a) != model_identity(b)
    copy = tmp_path / "copy.gguf"
    copy.write_bytes(open(a.path, "rb").read())
    same = open_model(copy)
    before = model_identity(same)
    assert before == model_identity(same)
    os.utime(copy, ns=(0, 0))  # rewritten in place (same bytes here): a new identity all the same
    assert model_identity(same) != before


def test_store_and_load_round_trip_and_the_bound_evicts(models, tmp_path):
    a, _ = models
    sl = plan_slices(a, 2)[1]
    weights = slice_weights(a, sl)
    weights.pop("token_embd.weight", None)
    expected = node_tensors(a.config, sl)
    weights = {n: w for n, w in weights.items() if n in expected}
    key = slice_key(model_identity(a), sl, weights)
    size = sum(w.nbytes for w in weights.values())
    lines = []
    c = SliceCache(tmp_path, limit=int(1.5 * size) + 4096, log=lines.append)
    c.store(key, weights, set(weights))
    got = c.load(key, expected)
    assert set(got) == set(weights)
    for n, w in weights.items():
        assert got[n].dtype == w.dtype and np.array_equal(got[n].data, np.ascontiguousarray(w.data))
    assert c.load("f" * 64, expected) == {}
    other = "e" * 64
    c.store(other, weights, set(weights))  # does not fit beside the first: the first is evicted
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == [other]
    assert any("evicted" in line for line in lines)
    tiny = SliceCache(tmp_path / "tiny", limit=size // 2, log=lines.append)
    tiny.store(key, weights, set(weights))
    assert tiny.load(key, expected) == {} and "exceeds --cache-size" in lines[-1]


def test_a_cut_write_counts_as_missing(models, tmp_path):
    a, _ = models
    sl = plan_slices(a, 2)[1]
    expected = node_tensors(a.config, sl)
    weights = {n: w for n, w in slice_weights(a, sl).items() if n in expected}
    c = SliceCache(tmp_path, log=lambda line: None)
    c.store("a" * 64, weights, set(weights))
    name = next(iter(weights))
    (tmp_path / ("a" * 64) / f"{name}.json").unlink()  # the data was written, its digest never was
    assert set(c.load("a" * 64, expected)) == set(weights) - {name}
    (tmp_path / ("a" * 64) / f"{next(iter(set(weights) - {name}))}.bin").write_bytes(b"short")
    assert len(c.load("a" * 64, expected)) == len(weights) - 2


def test_parse_size():
    assert parse_size("20G") == 20 << 30
    assert parse_size("512MiB") == 512 << 20
    assert parse_size("1.5k") == 1536
    assert parse_size("4096") == 4096
    for bad in ("", "G", "-1G", "nan", "inf", "2X", "0"):
        with pytest.raises(DllamaError, match="--cache-size"):
            parse_size(bad)


@pytest.mark.parametrize(
    "args, want",
    [
        (["--cache-size", "1G"], "give --cache-dir too"),
        (["--cache-dir", "/tmp", "--cache-size", "lots"], "--cache-size 'lots'"),
        (["--cache-dir", "/proc/version/x"], "--cache-dir /proc/version/x: cannot write there"),
    ],
)
def test_worker_refuses_bad_cache_options_in_one_line(args, want):
    p = subprocess.run(
        [sys.executable, "-m", "engine.cli", "worker", "--port", "0", "--nthreads", "1", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 2 and want in p.stderr and "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1
