"""The integer block-dot kernels (32-value block weights x Q80 activations, one row and batches) against
float64 products of the gguf-py-decoded blocks: every code, the extreme ones included, on the AVX2 path and
on the portable one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from blocks import decode, random_weight

from cpu_fallback import kernels as K

LEGACY = ("q40", "q41", "q50", "q51", "q80")
TESTS = Path(__file__).resolve().parent.parent


def random_q80(batch: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Q80 activation rows with uniformly random codes -128..127 (the quantiser makes only -127..127)."""
    xq = rng.integers(0, 256, (batch, cols // 32, 34), dtype=np.uint8)
    xq[..., :2] = np.array([0.03], np.float16).view(np.uint8)
    return xq.reshape(batch, -1)


def check_integer_kernels(rng: np.random.Generator) -> None:
    """Each legacy type, row counts that are not multiples of the 4-row quads: matmul_q80 of one matrix, the
    one-launch step of three matrices (bind_matmuls) and batches of an odd and an even row count within
    float32 rounding of the exact products, on whichever integer path this process compiled, and each batch
    row within a few float32 roundings of the single-row result (the same exact block dots)."""
    for wtype in LEGACY:
        cols = 96
        ws = [random_weight(wtype, rows, cols, rng) for rows in (37, 5, 12)]
        xq = random_q80(5, cols, rng)
        outs = [np.full((1, w.shape[0]), np.nan, np.float32) for w in ws]
        K.bind_matmuls([(w, wtype) for w in ws], xq[:1], outs)(1)
        singles = np.full((5, 37), np.nan, np.float32)
        for b in range(5):
            K.matmul_q80(ws[0], wtype, xq[b : b + 1], singles[b : b + 1])
        batches = []
        for n in (2, 5):
            batches.append(np.full((n, 37), np.nan, np.float32))
            K.matmul_q80(ws[0], wtype, xq[:n], batches[-1])
        xd = decode(xq, "q80")
        scale = np.abs(xd) @ np.abs(decode(ws[0], wtype)).T
        for out in batches:
            assert np.all(np.abs(out - singles[: out.shape[0]]) <= 2e-6 * scale[: out.shape[0]]), wtype
        for w, out in [*zip(ws, outs, strict=True), (ws[0], singles), *((ws[0], b) for b in batches)]:
            wf, x = decode(w, wtype), xd[: out.shape[0]]
            bound = 1e-5 * (np.abs(x) @ np.abs(wf).T) + 1e-30
            assert np.all(np.abs(out - x @ wf.T) <= bound), wtype


def test_integer_block_dots_of_every_legacy_type():
    check_integer_kernels(np.random.default_rng(7))


@pytest.mark.skipif(not K._X86_AVX2, reason="this CPU already runs the portable path in every test")
def test_portable_integer_path_without_avx2(tmp_path):
    """The generic vector IR (what ARM and pre-AVX2 CPUs compile) gives the same exact dots."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "from cpu_fallback import kernels as K\n"
        "K._X86_AVX2 = False\n"  # before the first compilation: every kernel below takes the generic IR
        "import numpy as np, test_int_dots as t\n"
        "t.check_integer_kernels(np.random.default_rng(7))\n"
        "asm = ''.join(K._MV_Q80[K._T_Q40].inspect_asm().values())\n"
        "print('portable ok', 'vpmaddubsw' in asm)\n"
    )
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))  # fresh compilations, not AVX2 ones from the cache
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS / "cpu_fallback"), str(TESTS)])
    done = subprocess.run(
        [sys.executable, "-c", code, str(TESTS)], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0 and "portable ok False" in done.stdout, done.stderr[-2000:]
