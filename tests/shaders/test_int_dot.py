"""The integer-dot matmul (INT_DOT: packed 4x8 dot products) of 32-value block weights times Q80 activations,
in the CPU-implementation split (with and without x shared by subgroup broadcast) and the GPU split (one
subgroup, several, shared memory), against the CPU backend's integer Q80 kernels; the float form beside it."""

from __future__ import annotations

import numpy as np
import pytest
from blocks import decode, q80_blocks, random_weight
from vk_harness import Ops

from cpu_fallback import kernels
from engine.graph import BufferSpec, Op
from engine.weights import Weight
from shaders.backend import Tuning, VulkanBackend

TYPES = ["q40", "q41", "q50", "q51", "q80"]
ROWS = 37  # no multiple of any row group (R = 2, 3, 4) or of rows x workgroup
SPV_SDOT = 4450  # OpSDot (SPV_KHR_integer_dot_product)
U = 2.0**-24  # float32 unit roundoff
CPU_SPLIT = Tuning(split=False, rows=4, batch=2, reduce_wg=16)
# name -> (subgroups, tuning): lavapipe's subgroups have 8 lanes (matvec_wg 8: one subgroup; 32: four)
PATHS = {
    "cpu-split-shared-x": (True, CPU_SPLIT),
    "cpu-split": (False, CPU_SPLIT),
    "gpu-subgroup": (True, Tuning(split=True, rows=3, batch=2, reduce_wg=64, matvec_wg=8, matmat_from=8)),
    "gpu-subgroups": (True, Tuning(split=True, rows=2, batch=4, reduce_wg=64, matvec_wg=32)),
    "gpu-shared": (False, Tuning(split=True, rows=1, batch=1, reduce_wg=64, matvec_wg=64)),
    "float-cpu-split": (True, Tuning(split=False, rows=4, batch=2, reduce_wg=16, int_dot=False)),
    "float-gpu": (True, Tuning(split=True, rows=2, batch=2, reduce_wg=64, matvec_wg=8, int_dot=False)),
}
BATCHES = (1, 7)  # 7: below every tuning's mat-mat threshold, so still the mat-vec path


def block_codes(data: np.ndarray, wtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per block of GGML's layout, decoded by hand: the scale d (rows, nb), the signed codes q (rows, nb, 32)
    with Q4_0/Q5_0's offset taken off, the minimum m (0 where the type has none)."""
    rows = data.shape[0]
    size = {"q40": 18, "q41": 20, "q50": 22, "q51": 24, "q80": 34}[wtype]
    b = data.reshape(rows, -1, size)
    d = b[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float64)
    m = np.zeros_like(d)
    if wtype in ("q41", "q51"):
        m = b[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float64)
    if wtype == "q80":
        return d, b[..., 2:].view(np.int8).astype(np.int64), m
    qs = b[..., size - 16 :].astype(np.int64)
    q = np.concatenate([qs & 0xF, qs >> 4], axis=-1)  # byte j: value j low, value j + 16 high
    if wtype in ("q50", "q51"):
        at = 2 if wtype == "q50" else 4
        qh = b[..., at : at + 4].copy().view(np.uint32)[..., 0].astype(np.int64)
        q |= ((qh[..., None] >> np.arange(32)) & 1) << 4
    offset = {"q40": 8, "q50": 16}.get(wtype, 0)
    return d, q - offset, m


def opcodes(code: bytes) -> set[int]:
    """The opcodes of a SPIR-V module's instructions (the header's 5 words skipped, then word count)."""
    words = np.frombuffer(code, np.uint32)
    ops, i = set(), 5
    while i < words.size:
        ops.add(int(words[i]) & 0xFFFF)
        i += max(int(words[i]) >> 16, 1)
    return ops


@pytest.fixture(scope="module", params=sorted(PATHS))
def path(request) -> tuple[str, VulkanBackend]:
    subgroups, tuning = PATHS[request.param]
    be = VulkanBackend(subgroups=subgroups, tuning=tuning)
    if tuning.int_dot and not be.int_dot:
        pytest.skip(f"{be.device.name} has no packed integer dot products")
    return request.param, be


@pytest.mark.parametrize("cols", [32, 64, 2048])
@pytest.mark.parametrize("wtype", TYPES)
def test_int_dot_matmul(path, wtype, cols):
    """y within float32 rounding of the CPU backend's exact integer block dots. Both sides form each block
    as (d_w * d_x) * s (+ (m_w * d_x) * sum(q_x)) with s an exact integer: at most 3 roundings per term,
    then a summation tree whose depth is at most nb (blocks in sequence per lane) + 6 (lanes, tree levels),
    so each is within (nb + 9) u A of the exact sum, A = sum over values of (|d_w q_w| + |m_w|) |d_x q_x|,
    and they differ by at most 2 (nb + 9) u A."""
    name, be = path
    rng = np.random.default_rng(cols + len(wtype) + TYPES.index(wtype))
    w = Weight("blk.0.ffn_up.weight", wtype, ROWS, cols, random_weight(wtype, ROWS, cols, rng))
    d, q, m = block_codes(w.data, wtype)
    np.testing.assert_array_equal(
        (d[..., None] * q + m[..., None]).reshape(ROWS, cols), decode(w.data, wtype)
    )
    w_abs = (np.abs(d[..., None] * q) + np.abs(m[..., None])).reshape(ROWS, cols)
    ops = Ops(
        be,
        [Op("matmul", "mm", ("h_q",), ("q",), w.name)],
        {"h_q": BufferSpec(cols, "q80"), "q": BufferSpec(ROWS)},
        {w.name: w},
        act="q80",
    )
    int_dot = be.tuning.int_dot
    assert ops.prog.shader_variant("mm") == (
        f"matmul_{wtype}",
        ("ACT_Q80", "INT_DOT") if int_dot else ("ACT_Q80",),
    )
    assert (SPV_SDOT in opcodes(be.shader(*ops.prog.shader_variant("mm")))) == int_dot, name
    nb = cols // 32
    for n in BATCHES:
        xq = q80_blocks(rng.standard_normal((n, cols)).astype(np.float32))
        ops.write("h_q", xq)
        ops.run(n)
        want = np.zeros((n, ROWS), np.float32)
        kernels.matmul_q80(w.data, wtype, xq, want)
        dx, qx, _ = block_codes(xq, "q80")
        x_abs = np.abs(dx[..., None] * qx).reshape(n, cols)
        bound = 2 * (nb + 9) * U * (x_abs @ w_abs.T)
        err = np.abs(ops.read("q")[:n].astype(np.float64) - want)
        worst = np.unravel_index(np.argmax(err / bound), err.shape)
        assert np.all(err <= bound), f"{name} n={n}: error {err[worst]:.3g}, bound {bound[worst]:.3g}"


def test_device_reports_integer_dot(vk):
    """kp enables VK_KHR_shader_integer_dot_product's feature exactly where the loader's own report
    (devices.py) has it, and the device's tuning then uses it (lavapipe has it)."""
    has = vk.device.integer_dot
    assert ("VK_KHR_shader_integer_dot_product" in vk.manager.enabled_extensions) == has
    assert ("shaderIntegerDotProduct" in vk.manager.enabled_features) == has
    assert vk.int_dot == has and ("integer dot products" in vk.description) == has
