"""Every kernel a forward pass uses comes from numba's on-disk cache in a second process: none is compiled
again (a kernel that misses its cache costs every worker, CLI run and API start seconds of compilation)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from tinymodel import write_tiny_gguf
from cpu_fallback.backend import CpuBackend
from engine.model_file import open_model
from engine.runner import Runner
for wtype in ("q40", "q41", "q80", "f32"):
    model = open_model(write_tiny_gguf({tmp!r} + "/" + wtype + ".gguf", wtype=wtype, seed=1, dim=256,
                                       hidden_dim=320, n_layers=2, n_heads=8, n_kv_heads=8, vocab=288))
    for act in ("f32", "q80"):
        r = Runner(model, CpuBackend(2), act, max_seq_len=32, max_batch=4)
        r.forward([1, 2, 3], 0)
        r.forward([4], 3)
"""


def test_a_second_process_compiles_no_kernel(tmp_path):
    code = SCRIPT.format(tests=str(ROOT / "tests"), tmp=str(tmp_path))
    env = dict(os.environ, NUMBA_DEBUG_CACHE="1")
    run = [sys.executable, "-c", code]
    runs = [subprocess.run(run, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900) for _ in "ab"]
    for r in runs:
        assert r.returncode == 0, r.stderr[-2000:]
    assert "data loaded" in runs[1].stdout  # the debug output is there: kernels came from the cache
    saved = [line for line in runs[1].stdout.splitlines() if "data saved" in line]
    assert not saved, saved
