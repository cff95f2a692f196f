"""tools/bench_peer.py: its random model files, a --short run against the C++ peer, a missing peer."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "bench_peer.py"
PEER = ROOT.parent / "shared" / "peers" / "distributed-llama" / "dllama"


def bench_peer():
    spec = importlib.util.spec_from_file_location("bench_peer", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_peer"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_random_model_files_have_the_shape_and_a_tokenizer_of_its_vocabulary(tmp_path):
    from engine.model_file import open_model
    from engine.tokenizer import load_tokenizer

    bp = bench_peer()
    m, t = bp.random_files(tmp_path, "tiny", bp.SHAPE_SHORT)
    cfg = open_model(m).config
    assert (cfg.dim, cfg.hidden_dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.vocab_size) == (
        128,
        256,
        2,
        4,
        2,
        32768,
    )
    # 2 layers of q, k, v, o (128x128, 64x128 twice, 128x128) and 3 FFN (256x128) matrices and a classifier
    # (32768x128), Q4_0 at 18 bytes per 32 values; f32 embedding (32768x128) and 5 norms of 128
    q40 = 2 * (2 * 128 * 128 + 2 * 64 * 128 + 3 * 256 * 128) + 32768 * 128
    assert m.stat().st_size == 8 + 8 * 16 + q40 // 32 * 18 + 4 * (32768 * 128 + 5 * 128)
    tok = load_tokenizer(t)
    assert tok.vocab_size == 32768
    assert tok.decode(tok.encode("The capital of France is")) == "The capital of France is"
    assert bp.prompt_of(5, t) and len(tok.encode(bp.prompt_of(60, t))) == 60


def test_a_missing_peer_is_one_line_and_exit_2(tmp_path):
    r = subprocess.run(
        [sys.executable, str(TOOL), "--peer", str(tmp_path / "nope"), "--short"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and str(tmp_path / "nope") in r.stderr


@pytest.mark.skipif(not PEER.is_file(), reason=f"the C++ peer {PEER} is not built beside the checkout")
def test_short_run_against_the_peer(tmp_path):
    out, png = tmp_path / "r.json", tmp_path / "c.png"
    cmd = [
        sys.executable,
        str(TOOL),
        "--short",
        "--cache",
        str(tmp_path),
        "--json",
        str(out),
        "--png",
        str(png),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert [row["case"] for row in res["results"]] == [
        "tiny decode 1 thr",
        "tiny prefill5 1 thr",
        "tiny decode 2 nodes",
    ]
    for row in res["results"]:
        assert row["dllama_tokens_per_s"] > 0 and row["peer_tokens_per_s"] > 0
        assert row["ratio"] == pytest.approx(row["dllama_tokens_per_s"] / row["peer_tokens_per_s"])
    two = res["results"][2]
    assert two["dllama_sync_ms_per_exchange"] > 0 and two["peer_sync_ms_per_exchange"] is not None
    assert len(res["load_average"]["start"]) == 3 and res["stream_gbytes_per_s_2_threads"] > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| tiny decode 2 nodes |" in r.stdout
