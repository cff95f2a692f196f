"""Helpers of the cluster tests: worker subprocesses and their logs, a pool that replaces dead workers,
the 8-KV-head tiny model shape, a check that workers still serve a real root, and greedy decoding through
any Runner. Every wait is bounded."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
IDLE = ("Listening on", "Waiting for a root")
# 8 KV heads of head_dim 32 (any split keeps whole 32-blocks); 10 FFN blocks split unevenly on 3, 4 nodes
TINY8 = dict(dim=256, hidden_dim=320, n_layers=2, n_heads=8, n_kv_heads=8, vocab=288)
TOKENS = [5, 17, 200, 3, 99, 42, 7, 150, 11]  # 9 tokens: batches of 4, 4, 1 with max_batch 4


def root(model, backend, workers, timeout: float = 3.0):
    """A root Runner (f32 sync, 64 positions, batches of 4) on these workers (WorkerProcs or addresses)."""
    from engine.runner import Runner

    addresses = [w if isinstance(w, str) else w.address for w in workers]
    return Runner(model, backend, "f32", 64, 4, workers=addresses, net_timeout=timeout, log=lambda line: None)


def assert_serves(model, backend, workers) -> None:
    """A new root on these workers computes the same logits as one node."""
    from engine.runner import Runner

    want = Runner(model, backend, "f32", 64, 4).forward(TOKENS, 0, "all")
    r = root(model, backend, workers)
    try:
        got = r.forward(TOKENS, 0, "all")
    finally:
        r.close()
    assert np.abs(got - want).max() <= 1e-4 * max(np.abs(want).max(), 1.0)


class WorkerProc:
    """A `dllama worker` subprocess on 127.0.0.1 (port 0 = any free port) and its collected log lines."""

    def __init__(self, backend: str = "cpu", args: tuple[str, ...] = ()):
        self.backend = backend
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "engine.cli",
                "--backend",
                backend,
                "worker",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--nthreads",
                "1",
                *args,
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        m = self.wait_for(r"Listening on (\S+):(\d+)\.\.\.", 0, timeout=60)
        self.host, self.port = m.group(1), int(m.group(2))
        self.address = f"{self.host}:{self.port}"
        self.stopped = False

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def mark(self) -> int:
        """Index of the next log line, for waiting on lines written after this point."""
        with self._cond:
            return len(self.lines)

    def wait_for(self, pattern: str, start: int, timeout: float = 20) -> re.Match:
        """The first log line from `start` on matching `pattern`; fails the test after `timeout` s."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            i = start
            while True:
                while i < len(self.lines):
                    m = rx.search(self.lines[i])
                    if m:
                        return m
                    i += 1
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and i >= len(self.lines)):
                    raise AssertionError(f"worker never logged {pattern!r}; log:\n" + "\n".join(self.lines))
                self._cond.wait(min(left, 0.5))

    def idle(self) -> bool:
        """Alive, not stopped, and its last session (if any) is over."""
        with self._cond:
            last = next((ln for ln in reversed(self.lines) if ln.startswith(("⭕", "Listening", "🚀"))), "")
        return self.proc.poll() is None and not self.stopped and any(s in last for s in IDLE)

    def rss(self) -> int:
        """Resident memory of the worker process in bytes (Linux /proc)."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)
        self.stopped = sig == signal.SIGSTOP

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)


class WorkerPool:
    """Idle workers on demand; a dead or stopped worker is replaced by a fresh process."""

    def __init__(self):
        self.workers: list[WorkerProc] = []

    def get(self, n: int, backend: str = "cpu") -> list[WorkerProc]:
        out: list[WorkerProc] = []
        for w in list(self.workers):
            if len(out) == n:
                break
            if w.proc.poll() is not None or w.stopped:
                self.workers.remove(w)
                w.close()
                continue
            deadline = time.monotonic() + 10
            while not w.idle() and time.monotonic() < deadline:
                time.sleep(0.05)
            if w.idle() and w.backend == backend:
                out.append(w)
        while len(out) < n:
            w = WorkerProc(backend)
            self.workers.append(w)
            out.append(w)
        return out

    def close(self) -> None:
        for w in self.workers:
            if w.stopped:
                w.proc.send_signal(signal.SIGCONT)
            w.close()


def greedy(runner, prompt: list[int], n: int) -> list[int]:
    """n greedy tokens after `prompt` (positions from 0), token by token."""
    logits = runner.forward(prompt, 0)
    out, pos = [], len(prompt)
    for _ in range(n):
        out.append(int(np.argmax(logits)))
        logits = runner.forward([out[-1]], pos)
        pos += 1
    return out


def _split(total: int, n_nodes: int, node: int) -> tuple[int, int]:
    base, extra = divmod(total, n_nodes)
    start = node * base + min(node, extra)
    return start, start + base + (node < extra)


def ref_forward_nodes(m, tokens: list[int], n_nodes: int, unit: int = 32) -> np.ndarray:
    """float64 logits of an n-node cluster with Q80 sync (tests/reference.py ref_forward with node_columns).

    Up to n_kv_heads nodes, node n owns the KV heads of an even split (the first nodes one more) with their
    query heads; beyond that, the query heads of an even split. FFN rows (of the dense FFN or of every expert)
    are whole `unit`-value blocks split the same way (256 where the down matrix is a K-quant).
    """
    from reference import ref_forward

    group, hd = m.n_heads // m.n_kv_heads, m.head_dim
    down = m.weights.get("blk.0.ffn_down.weight")
    hidden = down.shape[1] if down is not None else m.weights["blk.0.ffn_down_exps.weight"].shape[2]
    units, per = (m.n_kv_heads, group * hd) if n_nodes <= m.n_kv_heads else (m.n_heads, hd)
    heads = [tuple(h * per for h in _split(units, n_nodes, k)) for k in range(n_nodes)]
    ffn = [tuple(b * unit for b in _split(hidden // unit, n_nodes, k)) for k in range(n_nodes)]
    return ref_forward(m, tokens, q80=True, node_columns=(heads, ffn))


def session_config(model, **kw) -> bytes:
    """A valid session config for node 1 of 2 of the tiny model (JSON), with fields replaced by `kw`."""
    from engine.slicing import node_slice
    from net.protocol import SessionConfig

    sc = SessionConfig(
        session="fuzz",
        node=1,
        n_nodes=2,
        act="f32",
        max_seq_len=64,
        max_batch=4,
        n_slots=1,
        kv_type="f32",
        timeout=3.0,
        heartbeat=1.0,
        weight_bytes=10**6,
        cache_key="0" * 64,
        peers=[("127.0.0.1", 1)],
        model=model.config,
        slice=node_slice(model.config, 1, 2),
    )
    d = json.loads(sc.to_bytes())
    for key, value in kw.items():
        if key.startswith("model_"):
            d["model"][key[6:]] = value
        else:
            d[key] = value
    return json.dumps(d).encode()
