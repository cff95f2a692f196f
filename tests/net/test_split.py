"""Weighted cluster splits: by --split or by every node's measured speed, the same tokens as one node (the
library's default, used by the other cluster tests, is the even split; the command line's is "auto")."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from netutil import ROOT, TOKENS, greedy

from engine.model_file import open_model
from engine.runner import Runner
from engine.slicing import plan_slices


def run(model, backend, workers, split=None):
    lines: list[str] = []
    addresses = [w.address for w in workers]
    r = Runner(model, backend, "f32", 64, 4, workers=addresses, log=lines.append, split=split)
    try:
        return greedy(r, TOKENS, 6), r.split_table, r.slices, lines
    finally:
        r.close()


def test_split_by_hand_follows_the_weights_and_keeps_the_tokens(pool, tiny8_paths, backend):
    model = open_model(tiny8_paths["q40"])
    want = greedy(Runner(model, backend, "f32", 64, 4), TOKENS, 6)
    got, table, _, lines = run(model, backend, pool.get(1), split=[3, 1])
    assert got == want
    assert [row["kv_heads"] for row in table] == [[0, 6], [6, 8]]  # 8 KV heads at 3:1
    assert [row["ffn_rows"] for row in table] == [[0, 256], [256, 320]]  # 10 blocks of 32: 7.5 + 2.5 -> 8 + 2
    assert [row["vocab_rows"] for row in table] == [[0, 216], [216, 288]]
    assert "🧮 Split by --split:" in lines and any(line.split()[:2] == ["1", "CPU"] for line in lines)


def test_by_default_the_split_follows_the_measured_speeds(pool, tiny8_paths, backend):
    model = open_model(tiny8_paths["q40"])
    want = greedy(Runner(model, backend, "f32", 64, 4), TOKENS, 6)
    got, table, slices, lines = run(model, backend, pool.get(2), split="auto")
    assert got == want
    (how,) = [line for line in lines if line.startswith("🧮 Split")]
    measured = [float(v) for v in re.search(r"by measured speed \((.*) GB/s\)", how).group(1).split(", ")]
    weights = [row["weight"] for row in table]
    assert len(measured) == 3 and all(v > 0 for v in measured)
    assert weights == [max(1, round(4 * v / max(measured))) / 4 for v in measured]  # quarters of the fastest
    assert slices == plan_slices(model, 3, weights)


@pytest.mark.parametrize(
    "args, want",
    [
        (["--split", "3,1"], "--split shares the work of a cluster: give --workers too"),
        (["--split", "auto"], "--split shares the work of a cluster: give --workers too"),
        (["--split", "3,x"], "'3,x': give auto or one positive number per node"),
        (["--split", "1,0"], "'1,0': give auto or one positive number per node"),
        (["--split", "2,1,1", "--workers", "127.0.0.1:1"], "3 weights: the cluster has 2 nodes"),
    ],
)
def test_bad_splits_are_refused_in_one_line(args, want, tiny8_paths):
    cmd = [sys.executable, "-m", "engine.cli", "inference", "--model", str(tiny8_paths["q40"])]
    p = subprocess.run(
        [*cmd, "--prompt", "a", "--steps", "1", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 2 and want in p.stderr and "Traceback" not in p.stderr, p.stderr
