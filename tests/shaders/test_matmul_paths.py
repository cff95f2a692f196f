"""Every matmul code path (coalesced mat-vec reduced by subgroups alone, by subgroups and shared memory, by
shared memory alone; the mat-mat tiles) in every weight type, against float64 products of gguf-py's own
de-quantisation, at batch sizes around the tile edges and with the weight cut into row pieces."""

from __future__ import annotations

import numpy as np
import pytest
from blocks import decode, random_weight, within
from vk_harness import Ops

from engine.graph import BufferSpec, Op
from engine.weights import Weight
from shaders.backend import Tuning, VulkanBackend
from shaders.weights import matrix_parts

WTYPES = ["f32", "f16", "bf16", "q40", "q41", "q50", "q51", "q80", "q4k", "q5k", "q6k"]
COLS = {t: 768 if t.endswith("k") else 1056 for t in WTYPES}  # 3 super-blocks / 33 blocks: odd counts
BATCHES = (1, 2, 7, 8, 9, 32)
# (subgroups, tuning): lavapipe's subgroups have 8 lanes, so matvec_wg 8 is one subgroup and 64 is eight
PATHS = {
    "matvec-subgroup": (True, Tuning(split=True, rows=3, batch=2, reduce_wg=64, matvec_wg=8)),
    "matvec-subgroups-shared": (True, Tuning(split=True, rows=2, batch=4, reduce_wg=64, matvec_wg=64)),
    "matvec-shared": (False, Tuning(split=True, rows=1, batch=1, reduce_wg=64, matvec_wg=32)),
    "matmat": (True, Tuning(split=True, rows=2, batch=2, reduce_wg=64, matvec_wg=8, matmat_from=8)),
    "matmat-no-subgroups": (False, Tuning(split=True, rows=2, batch=2, reduce_wg=64, matmat_from=2)),
}


@pytest.fixture(scope="module", params=sorted(PATHS))
def path_vk(request) -> VulkanBackend:
    subgroups, tuning = PATHS[request.param]
    return VulkanBackend(subgroups=subgroups, tuning=tuning)


@pytest.mark.parametrize("cut", [0, 10])
@pytest.mark.parametrize("act", ["f32", "q80"])
@pytest.mark.parametrize("wtype", WTYPES)
def test_matmul_paths(path_vk, monkeypatch, wtype, act, cut):
    """37 rows (no multiple of a row group or tile), whole or in pieces of `cut` rows; batches 1 to 32
    (decode grids at 1, the prefill grids, mat-mat where the tuning allows, from 2 on)."""
    rng = np.random.default_rng(5)
    rows, cols = 37, COLS[wtype]
    w = Weight("output.weight", wtype, rows, cols, random_weight(wtype, rows, cols, rng))
    if cut:
        monkeypatch.setattr(path_vk, "buffer_limit", cut * matrix_parts(w)[0].row_words * 4)
    wf = decode(w.data, wtype)
    xin = "h_q" if act == "q80" else "h"
    ops = Ops(
        path_vk,
        [Op("matmul", "mm", (xin,), ("logits",), w.name)],
        {xin: BufferSpec(cols, act), "logits": BufferSpec(rows)},
        {w.name: w},
        act=act,
        max_batch=32,
    )
    assert len(ops.prog.slots[w.name]) == (-(-rows // cut) if cut else 1)
    for n in BATCHES:
        x = rng.standard_normal((n, cols)).astype(np.float32)
        x64 = ops.write_activations(xin, x, act)
        ops.run(n)
        within(ops.read("logits")[:n], x64 @ wf.T, np.abs(x64) @ np.abs(wf).T)
