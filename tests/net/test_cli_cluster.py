"""The cluster through the command line: `--workers` syntaxes, read-outs, exit codes when a node dies."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from netutil import ROOT, TINY8
from tinymodel import write_tiny_gguf

from engine.cli import _expand_workers, _worker_list


def dllama(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, "-m", "engine.cli", *args],
        cwd=ROOT,
        text=True,
        capture_output=True,
        timeout=timeout,
        env=env,
    )


@pytest.fixture(scope="module")
def long_tiny(tmp_path_factory):
    """The 8-KV-head model with a 4096-token context, so a generation lasts long enough to interrupt."""
    path = tmp_path_factory.mktemp("m") / "long.gguf"
    return write_tiny_gguf(path, wtype="q40", seed=3, context=4096, **TINY8)


def test_workers_option_syntaxes():
    argv = ["inference", "--workers", "a:1", "b:2", "--steps", "3", "--workers", "c:3,d:4"]
    assert _expand_workers(argv) == [
        "inference",
        "--workers",
        "a:1",
        "--workers",
        "b:2",
        "--steps",
        "3",
        "--workers",
        "c:3,d:4",
    ]
    assert _worker_list(["a:1", "b:2", "c:3,d:4", "e:5 f:6"]) == ["a:1", "b:2", "c:3", "d:4", "e:5", "f:6"]


def test_inference_on_three_nodes_matches_one_node(pool, tiny8_paths, tmp_path):
    base = [
        "inference",
        "--model",
        str(tiny8_paths["q40"]),
        "--prompt",
        "hello there",
        "--steps",
        "12",
        "--temperature",
        "0",
        "--ignore-eos",
        "--nthreads",
        "1",
        "--buffer-float-type",
        "q80",
    ]
    one = dllama(*base, "--json", str(tmp_path / "one.json"))
    assert one.returncode == 0, one.stderr
    w1, w2 = pool.get(2)
    even = ["--split", "1,1,1"]  # spec 5.8's even split (the default follows measured speeds)
    three = dllama(*base, *even, "--json", str(tmp_path / "three.json"), "--workers", w1.address, w2.address)
    assert three.returncode == 0, three.stderr
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "three.json"))
    assert b["nodes"] == 3 and a["nodes"] == 1
    assert [row["kv_heads"] for row in b["split"]] == [[0, 3], [3, 6], [6, 8]] and a["split"] == []
    assert "🧮 Split by --split:" in three.stdout
    assert b["generated_ids"] == a["generated_ids"]
    # spec 5.8 with D=256, L=2, V=288, N=3, Q80 slices of 272 bytes
    assert b["decode_sent_bytes_per_token"] == 2 * (8 + 4 * 256 + 4 * 272)
    assert b["decode_recv_bytes_per_token"] == 2 * 4 * 272 + 4 * 288 * 2 // 3
    assert a["decode_sent_bytes_per_token"] == 0
    # network steps per token (spec 5.8): the broadcast of x, 2L all-slices exchanges, the logits gather
    assert (a["decode_exchanges_per_token"], b["decode_exchanges_per_token"]) == (0, 2 * 2 + 2)
    sync_ms = b["decode_sync_s"] * 1e3 / b["decode_tokens"]
    assert b["decode_sync_ms_per_exchange"] == pytest.approx(sync_ms / 6) and sync_ms > 0
    assert "⭕ Worker 2 at " + w2.address in three.stdout
    assert "Sent     4 kB Recv     2 kB" in three.stdout  # the per-token read-out: 4240 B and 2944 B


def test_perplexity_on_two_nodes_matches_one_node(pool, tiny8_paths, tmp_path):
    base = [
        "perplexity",
        "--model",
        str(tiny8_paths["f32"]),
        "--prompt",
        "the quick brown fox jumps",
        "--nthreads",
        "1",
    ]
    one = dllama(*base, "--json", str(tmp_path / "one.json"))
    (w,) = pool.get(1)
    two = dllama(*base, "--json", str(tmp_path / "two.json"), "--workers", w.address)
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert a["n_scored"] == b["n_scored"] > 10
    assert abs(a["perplexity"] - b["perplexity"]) <= 1e-4 * a["perplexity"]


class Generation:
    """A `dllama inference` root in the background whose output lines are collected as they come."""

    def __init__(self, model, workers):
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "engine.cli",
                "inference",
                "--model",
                str(model),
                "--prompt",
                "hi",
                "--steps",
                "4000",
                "--max-seq-len",
                "4096",
                "--temperature",
                "0",
                "--ignore-eos",
                "--nthreads",
                "1",
                "--buffer-float-type",
                "q80",
                "--workers",
                *[w.address for w in workers],
            ],
            cwd=ROOT,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
        self.predicting = threading.Event()  # set once a few tokens came out: mid-generation
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        tokens = 0
        for line in self.proc.stdout:
            tokens += line.startswith("🔶 Pred")
            if tokens == 5:
                self.predicting.set()

    def wait_predicting(self) -> None:
        if not self.predicting.wait(60):
            self.proc.kill()
            raise AssertionError("the root never started predicting: " + self.proc.stderr.read())

    def finish(self, timeout: float) -> tuple[int, str]:
        try:
            self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        return self.proc.returncode, self.proc.stderr.read()


def test_cli_root_exits_2_when_a_worker_dies(pool, long_tiny):
    w1, w2 = pool.get(2)
    m2 = w2.mark()
    gen = Generation(long_tiny, [w1, w2])
    gen.wait_predicting()
    t0 = time.monotonic()
    w1.proc.kill()
    code, err = gen.finish(10)
    assert time.monotonic() - t0 < 5
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err
    assert lines[0].startswith(f"error: worker 1 ({w1.address}) closed the connection"), lines[0]
    w2.wait_for("Session ended", m2)  # the surviving worker is free for the next root
    w2.wait_for("Waiting for a root", m2)


def test_worker_serves_a_new_root_after_the_root_is_killed(pool, tiny8_paths, long_tiny):
    (w,) = pool.get(1)
    m = w.mark()
    gen = Generation(long_tiny, [w])
    gen.wait_predicting()
    gen.proc.kill()
    gen.finish(10)
    w.wait_for("Session ended: the root .* closed the connection", m)
    w.wait_for("Waiting for a root", m)
    r = dllama(
        "inference",
        "--model",
        str(tiny8_paths["f32"]),
        "--prompt",
        "hi",
        "--steps",
        "3",
        "--nthreads",
        "1",
        "--workers",
        w.address,
    )
    assert r.returncode == 0, r.stderr


def test_worker_port_in_use_is_a_one_line_error(pool):
    (w,) = pool.get(1)
    r = dllama("worker", "--host", "127.0.0.1", "--port", str(w.port), timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: cannot listen on 127.0.0.1:{w.port}: Address already in use"


def test_worker_gives_up_a_stopped_root(pool, tiny8_paths, long_tiny):
    """A SIGSTOPped root holds no worker hostage: in a forward pass the worker waits --net-timeout + 1 s,
    between passes 10 s (the root's heartbeat stops with it), then serves the next root."""
    (w,) = pool.get(1)
    m = w.mark()
    gen = Generation(long_tiny, [w])
    try:
        gen.wait_predicting()
        gen.proc.send_signal(signal.SIGSTOP)
        t0 = time.monotonic()
        w.wait_for(r"Session ended: the root \(\S+\) sent nothing for (4|10) s", m, timeout=15)
        assert time.monotonic() - t0 < 12
        w.wait_for("Waiting for a root", m)
        r = dllama(
            "inference",
            "--model",
            str(tiny8_paths["f32"]),
            "--prompt",
            "hi",
            "--steps",
            "3",
            "--nthreads",
            "1",
            "--workers",
            w.address,
        )
        assert r.returncode == 0, r.stderr
    finally:
        gen.proc.kill()
        gen.proc.wait(10)
