"""The integer block-dot kernels (32-value block weights x Q80 activations, one row and batches) against
float64 products of the gguf-py-decoded blocks: every code, the extreme ones included, on the AVX-VNNI, AVX2
and portable paths."""

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
    one-launch step of three matrices (bind_matmuls, one row and five) and batches of an odd and an even row
    count within float32 rounding of the exact products, on whichever integer path this process compiled,
    and each batch row within a few float32 roundings of the single-row result (the same exact block dots)."""
    for wtype in LEGACY:
        cols = 96
        ws = [random_weight(wtype, rows, cols, rng) for rows in (37, 5, 12)]
        xq = random_q80(5, cols, rng)
        outs = [np.full((5, w.shape[0]), np.nan, np.float32) for w in ws]
        step = K.bind_matmuls([(w, wtype) for w in ws], xq, outs)
        step(1)
        firsts = [out[:1].copy() for out in outs]
        step(5)
        singles = np.full((5, 37), np.nan, np.float32)
        for b in range(5):
            K.matmul_q80(ws[0], wtype, xq[b : b + 1], singles[b : b + 1])
        batches = []
        for n in (2, 3, 5):  # row by row, four rows (one repeated), four rows then one
            batches.append(np.full((n, 37), np.nan, np.float32))
            K.matmul_q80(ws[0], wtype, xq[:n], batches[-1])
        xd = decode(xq, "q80")
        scale = np.abs(xd) @ np.abs(decode(ws[0], wtype)).T
        for out in batches:
            assert np.all(np.abs(out - singles[: out.shape[0]]) <= 2e-6 * scale[: out.shape[0]]), wtype
        pairs = [*zip(ws, outs, strict=True), *zip(ws, firsts, strict=True), (ws[0], singles)]
        for w, out in [*pairs, *((ws[0], b) for b in batches)]:
            wf, x = decode(w, wtype), xd[: out.shape[0]]
            bound = 1e-5 * (np.abs(x) @ np.abs(wf).T) + 1e-30
            assert np.all(np.abs(out - x @ wf.T) <= bound), wtype


def test_integer_block_dots_of_every_legacy_type():
    check_integer_kernels(np.random.default_rng(7))


PATHS = [  # (flags forced before compiling, then whether the Q4_0 kernels contain vpmaddubsw, vpdpbusd)
    ("K._X86_AVX2 = K._X86_VNNI = False; K._PAIRS16 = True", False, False),  # the generic IR of ARM, pre-AVX2
    ("K._X86_VNNI = False; K._PAIRS16 = True", True, False),  # AVX2 without AVX-VNNI
    ("", False, True),  # AVX-VNNI
]


# the paths this CPU can run (without AVX2 only the portable one, which every other test here already takes)
OWN = PATHS if K._X86_VNNI else PATHS[:1] if K._X86_AVX2 else []


@pytest.mark.parametrize("flags,pmadd,dpbusd", OWN)
def test_integer_paths_of_this_cpu(flags, pmadd, dpbusd, tmp_path):
    """Each integer path this CPU can run, compiled afresh (cached code has no assembly to inspect), gives
    the exact dots and uses the instructions it is meant to."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1])\n"
        "from cpu_fallback import kernels as K\n"
        f"{flags}\n"  # before the first compilation: every kernel below takes that path
        "import numpy as np, test_int_dots as t\n"
        "t.check_integer_kernels(np.random.default_rng(7))\n"
        "asm = ''.join(K._MV_Q80[K._T_Q40].inspect_asm().values())\n"
        "asm += ''.join(K._MM_Q80[K._T_Q40].inspect_asm().values())\n"
        "print('path ok', 'vpmaddubsw' in asm, 'vpdpbusd' in asm)\n"
    )
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))  # fresh compilations, not ones from the cache
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS / "cpu_fallback"), str(TESTS)])
    done = subprocess.run(
        [sys.executable, "-c", code, str(TESTS)], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0 and f"path ok {pmadd} {dpbusd}" in done.stdout, done.stderr[-2000:]
