"""tools/bench_cluster.py --short: a root and a worker in two network namespaces joined by a veth pair."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from netutil import ROOT


def test_bench_cluster_short_run_in_two_namespaces(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("creating network namespaces needs root (CI runs as root)")
    if shutil.which("ip") is None:
        pytest.skip("creating network namespaces needs the ip command (iproute2)")
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "tools/bench_cluster.py", "--short", "--json", str(out), "--timeout", "240"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    (row,) = json.loads(out.read_text())
    assert (row["setting"], row["nodes"]) == ("netns", 2)
    assert row["tokens"] > 0 and row["tokens_per_s"] > 0
    # SmolLM2-135M, Q80 sync (spec 5.8 with D=576, L=30, V=49152, N=2, slices of 576/32*34 = 612 bytes)
    assert row["sent_bytes"] == 8 + 4 * 576 + 60 * 612
    assert row["recv_bytes"] == 60 * 612 + 4 * 49152 // 2
    assert "| netns | 2 |" in r.stdout
    prefix = re.search(r"namespaces (dllb\d+n)0\.\.", r.stderr).group(1)
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30).stdout
    assert prefix not in left  # the tool deleted what it created
