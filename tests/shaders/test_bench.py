"""tools/shader_bench.py --quick in a subprocess: report structure, byte accounting, copy fractions, PNG."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WTYPES = ["f32", "f16", "bf16", "q40", "q41", "q50", "q51", "q80", "q4k", "q5k", "q6k"]
SHADERS = [
    *(f"matmul_{t}" for t in WTYPES),
    *(f"matmul_{t}/q80" for t in WTYPES[3:]),
    "rmsnorm",
    "rope",
    "attention@256",
    "silu_mul",
    "quantize_q80",
    "merge_add_f32",
    "merge_add_q80",
    "embedding_q40",
]


def test_quick_bench_writes_json_and_plot(tmp_path):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    cmd = [sys.executable, "tools/shader_bench.py", "--quick", "--json", str(out), "--plot", str(png)]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads(out.read_text())

    assert report["quick"] is True and report["skipped"] == []
    dev = report["device"]
    if "llvmpipe" in dev["name"]:
        assert "CPU emulation (lavapipe)" in dev["label"] and dev["emulated"] is True
    assert dev["label"] in res.stdout  # the table's title names the device
    assert dev["matmul"]["split"] is not dev["emulated"]  # the chosen work split, for gpu_check's record
    assert dev["matmul"]["matmat_tile"] == {"rows": 16, "batch": 16, "workgroup": 64}
    copy = report["copy_gbps"]
    assert copy > 0

    rows = {r["shader"]: r for r in report["results"]}
    # a device with packed integer dot products (lavapipe) also times the INT_DOT form of 32-value blocks
    idot = [f"matmul_{t}/q80-idot" for t in WTYPES[3:8]] if dev["matmul"]["int_dot"] else []
    assert sorted(rows) == sorted(SHADERS + idot)
    for name, r in rows.items():
        assert r["model"] == "SmolLM2-135M"
        for key in ("gpu_us", "gpu_gbps", "gpu_gflops", "cpu_us", "cpu_gbps"):
            assert r[key] > 0, (name, key)
        assert math.isclose(r["gpu_gbps"], r["bytes"] / (r["gpu_us"] * 1e3), rel_tol=1e-9)
        assert math.isclose(r["cpu_gbps"], r["bytes"] / (r["cpu_us"] * 1e3), rel_tol=1e-9)
        assert math.isclose(r["gpu_gflops"], r["flops"] / (r["gpu_us"] * 1e3), rel_tol=1e-9)
        if name.startswith("matmul_"):
            assert math.isclose(r["copy_fraction"], r["gpu_gbps"] / copy, rel_tol=1e-9)
            assert f"{100 * r['copy_fraction']:.0f}%" in res.stdout
        else:
            assert "copy_fraction" not in r

    # hand-computed accounting for the 576x1536 FFN down matrix: Q4_0 blocks of 18 bytes, f32 in, f32 out
    q40 = rows["matmul_q40"]
    assert q40["shape"] == "576x1536"
    assert q40["bytes"] == 576 * 1536 // 32 * 18 + 1536 * 4 + 576 * 4
    assert q40["flops"] == 2 * 576 * 1536
    assert rows["matmul_q41/q80"]["bytes"] == 576 * 1536 // 32 * 20 + 1536 // 32 * 34 + 576 * 4
    # K-quant super-blocks of 256 values: Q4_K 144 bytes, Q6_K 210 bytes
    assert rows["matmul_q4k"]["bytes"] == 576 * 1536 // 256 * 144 + 1536 * 4 + 576 * 4
    assert rows["matmul_q6k/q80"]["bytes"] == 576 * 1536 // 256 * 210 + 1536 // 32 * 34 + 576 * 4
    # decode attention at position 256: q and out (9 heads x 64), 257 K and V rows of 3 x 64
    assert rows["attention@256"]["bytes"] == (2 * 9 * 64 + 2 * 257 * 3 * 64) * 4

    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
