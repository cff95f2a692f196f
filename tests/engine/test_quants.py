"""engine.quants against the original project's golden bytes, hand-made blocks and gguf-py's own codecs."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as GT

from engine.errors import DllamaError
from engine.quants import dequantize, quantize, quantize_q40, quantize_q80

DATA = Path(__file__).resolve().parent.parent / "data"

# converter/writer-test.py of distributed-llama: Q40 of torch.manual_seed(1); torch.randn(32, 16).
GOLDEN_Q40 = (
    "7e346345a692b89665b2c5790537876e598aaa366d988876a898b8d788a98868ce660c66f6b3a88cba5ce9a871987ba9cc5bcaaa"
    "760c1eb556a4455b747b6b9504968828ef2a8d7c1db5c6be3764799e66db6d8e76463126a30e4333cad7a4f645947c6cf97f9de0"
    "86d468c8d535a6ba7dc799d3d0c657bab6799468cad8bb349eb7d7635c7c798998696bb38e4085a9eb34444ba96a7f8ba7b2b42d"
    "746a96cf9660aeb4499d8708ad5c7b9a7558947645f3bbb6b0346a656887ad9a86059baac5c596ab781c703569bb8a4356a4bd58"
    "cb78736ba09759bb0e34a6274e827b957d7a67dfa86846955660d234b6d9d78a378094a8a8708a7a774ae92f8a36b8c999a9b77a"
    "7d958a69747c807963941235379886d69a7a8767b3a6a4ac71999760"
)

# GGML id, values and bytes per block and the byte offsets of the f16 scale fields, from the GGML layouts.
LAYOUT = {
    "q40": (GT.Q4_0, 32, 18, (0,)),
    "q41": (GT.Q4_1, 32, 20, (0, 2)),
    "q50": (GT.Q5_0, 32, 22, (0,)),
    "q51": (GT.Q5_1, 32, 24, (0, 2)),
    "q80": (GT.Q8_0, 32, 34, (0,)),
    "q4k": (GT.Q4_K, 256, 144, (0, 2)),
    "q5k": (GT.Q5_K, 256, 176, (0, 2)),
    "q6k": (GT.Q6_K, 256, 210, (208,)),
}
# Relative RMS error of quantize -> dequantize on standard normal values (measured: 0.086, 0.078, 0.043,
# 0.038, 0.0054, 0.074, 0.036, 0.019, f16 2e-4, bf16 1.7e-3), with a little headroom.
REL_RMS = {
    "f32": 0.0,
    "f16": 3e-4,
    "bf16": 2.5e-3,
    "q40": 0.095,
    "q41": 0.085,
    "q50": 0.048,
    "q51": 0.042,
    "q80": 0.006,
    "q4k": 0.08,
    "q5k": 0.04,
    "q6k": 0.021,
}
GGUF_QUANTIZERS = {
    "q40": GT.Q4_0,
    "q41": GT.Q4_1,
    "q50": GT.Q5_0,
    "q51": GT.Q5_1,
    "q80": GT.Q8_0,
    "bf16": GT.BF16,
}


def rel_rms(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.sqrt(np.mean((got - want) ** 2) / np.mean(want**2)))


# ----------------------------------------------------------------------------------------------------------
# distributed-llama's Q40 / Q80 rules, byte for byte


def test_q40_golden_bytes() -> None:
    x = np.load(DATA / "torch_randn_seed1_32x16.npy")
    assert x.dtype == np.float32 and x.shape == (512,)
    assert quantize_q40(x).tobytes().hex() == GOLDEN_Q40


def test_q40_hand_computed_block() -> None:
    # extreme -4 (negative) -> d = 0.5, id = 2: x = -4 -> 0, x = 3.5 -> trunc(15.5) = 15, 0 -> 8, 0.3 -> 9
    x = np.zeros(32, dtype=np.float32)
    x[0], x[1], x[16], x[17] = -4.0, 3.5, 0.3, -0.3
    b = quantize_q40(x)
    assert b.shape == (18,)
    assert b[:2].view("<f2")[0] == np.float16(0.5)
    qs = b[2:]
    assert qs[0] == 0 | (9 << 4)  # element 0 low nibble, element 16 high nibble
    assert qs[1] == 15 | (7 << 4)  # -0.3 * 2 + 8.5 = 7.9 -> 7
    assert all(v == 0x88 for v in qs[2:])


def test_q40_zero_block_and_length_check() -> None:
    b = quantize_q40(np.zeros(32, dtype=np.float32))
    assert b[:2].view("<f2")[0] == 0 and all(b[2:] == 0x88)  # d = 0 / -8 (stored as -0.0, as C++ does)
    with pytest.raises(DllamaError, match="multiple of the block size"):
        quantize_q40(np.zeros(33, dtype=np.float32))


def test_q80_hand_computed_ties_round_half_even() -> None:
    x = np.zeros(32, dtype=np.float32)
    x[:5] = [127.0, 0.5, 1.5, 2.5, -2.5]  # d = 1 exactly
    b = quantize_q80(x)
    assert b[:2].view("<f2")[0] == np.float16(1.0)
    assert list(b[2:7].view(np.int8)) == [127, 0, 2, 2, -2]


# ----------------------------------------------------------------------------------------------------------
# Decoding: gguf-py's dequantize is the oracle


def random_blocks(dtype: str, n_blocks: int, seed: int) -> np.ndarray:
    """Random bytes in every field, then finite f16 scales of a sensible range over the scale fields."""
    _, _, nbytes, scale_at = LAYOUT[dtype]
    rng = np.random.default_rng(seed)
    b = rng.integers(0, 256, (n_blocks, nbytes), dtype=np.uint8)
    for at in scale_at:
        scale = (rng.uniform(-1, 1, n_blocks) * 10.0 ** rng.uniform(-4, 0, n_blocks)).astype("<f2")
        b[:, at : at + 2] = scale.view(np.uint8).reshape(-1, 2)
    return b


@pytest.mark.parametrize("dtype", list(LAYOUT))
def test_dequantize_random_blocks_matches_gguf(dtype: str) -> None:
    gt, values, _, _ = LAYOUT[dtype]
    rows, cols = 6, 4 * values
    b = random_blocks(dtype, rows * 4, seed=len(dtype) + values).reshape(rows, -1)
    got = dequantize(b, dtype, rows, cols)
    assert got.shape == (rows, cols) and got.dtype == np.float32
    np.testing.assert_array_equal(got, gguf.quants.dequantize(b, gt).reshape(rows, cols))


@pytest.mark.parametrize(("dtype", "elem"), [("f32", "<f4"), ("f16", "<f2")])
def test_dequantize_plain_floats(dtype: str, elem: str) -> None:
    x = np.random.default_rng(4).standard_normal((3, 8)).astype(elem)
    got = dequantize(x, dtype, 3, 8)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, x.astype(np.float32))


def test_dequantize_bf16_bits_by_hand() -> None:
    bits = np.array([[0x3FC0, 0x3E80, 0xC000, 0x0000]], dtype=np.uint16)  # 1.5, 0.25, -2, 0
    np.testing.assert_array_equal(dequantize(bits, "bf16", 1, 4), [[1.5, 0.25, -2.0, 0.0]])


def test_dequantize_strided_expert_stack() -> None:
    """Weight data of an expert stack may be a strided view; each expert decodes as its own bytes."""
    stack = random_blocks("q4k", 4 * 3 * 2, seed=9).reshape(4, 3, 2 * 144)
    every_other = stack[::2]
    assert not every_other.flags.c_contiguous
    got = dequantize(every_other, "q4k", 2 * 3, 512).reshape(2, 3, 512)
    for k, e in enumerate((0, 2)):
        np.testing.assert_array_equal(got[k], gguf.quants.dequantize(stack[e], GT.Q4_K).reshape(3, 512))


# ----------------------------------------------------------------------------------------------------------
# Encoding: accuracy, exact round trips, agreement with gguf-py's quantizers


@pytest.mark.parametrize("dtype", list(REL_RMS))
def test_quantize_round_trip_error(dtype: str) -> None:
    x = np.random.default_rng(0).standard_normal((16, 512)).astype(np.float32)
    q = quantize(x, dtype)
    got = dequantize(q, dtype, 16, 512)
    assert rel_rms(got, x) <= REL_RMS[dtype]
    if dtype in LAYOUT:  # and gguf-py decodes the blocks to the same values
        oracle = gguf.quants.dequantize(q.view(np.uint8), LAYOUT[dtype][0]).reshape(16, 512)
        np.testing.assert_array_equal(got, oracle)


@pytest.mark.parametrize("dtype", ["q4k", "q5k"])
def test_k_quant_sub_blocks_keep_their_own_scale(dtype: str) -> None:
    """Sub-blocks of 32 down to 1/20 of the super-block's largest: each keeps a small relative error."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((32, 512)).astype(np.float32)
    x *= np.exp(rng.uniform(-3, 0, (32, 16))).repeat(32, axis=1).astype(np.float32)
    got = dequantize(quantize(x, dtype), dtype, 32, 512)
    err = np.sqrt(np.mean((got - x).reshape(-1, 32) ** 2, axis=1) / np.mean(x.reshape(-1, 32) ** 2, axis=1))
    assert err.max() <= (0.15 if dtype == "q4k" else 0.08)


def representable(dtype: str, rng: np.random.Generator) -> np.ndarray:
    """One row of values that `dtype` can store exactly (power-of-two scales, every code and extreme used)."""
    if dtype in ("q40", "q50", "q41", "q51"):
        top = {"q40": 15, "q50": 31, "q41": 15, "q51": 31}[dtype]
        codes = np.concatenate([rng.permutation(np.resize(np.arange(top + 1), 32)) for _ in range(2)])
        if dtype in ("q41", "q51"):  # min -1.5 and max both occur in every block: d = 0.25
            return -1.5 + 0.25 * codes
        return 2.0**-5 * (codes - (top + 1) // 2)  # the extreme is the negative one: d = 2^-5
    if dtype == "q80":
        codes = rng.integers(-127, 128, 64)
        codes[[0, 40]] = [127, -127]
        return 2.0**-6 * codes
    if dtype == "q6k":
        sc = rng.integers(-127, 128, 16)
        sc[3] = 127  # d = max |scale| / 127
        codes = rng.integers(0, 64, (16, 16))
        codes[:, 0] = 0  # each sub-block's extreme -32·d·sc fixes its scale
        return (2.0**-8 * sc[:, None] * (codes - 32)).reshape(-1)
    top = 15 if dtype == "q4k" else 31
    sc, mn = rng.integers(1, 64, 8), rng.integers(0, 64, 8)
    sc[2], mn[5] = 63, 63
    codes = rng.integers(0, top + 1, (8, 32))
    codes[:, 0], codes[:, 1] = 0, top
    return (2.0**-7 * sc[:, None] * codes - 2.0**-6 * mn[:, None]).reshape(-1)


@pytest.mark.parametrize("dtype", list(LAYOUT))
def test_quantize_exact_where_representable(dtype: str) -> None:
    rng = np.random.default_rng(11)
    x = np.stack([representable(dtype, rng) for _ in range(4)]).astype(np.float32)
    q = quantize(x, dtype)
    decoded = gguf.quants.dequantize(q.view(np.uint8), LAYOUT[dtype][0]).reshape(x.shape)
    np.testing.assert_array_equal(decoded, x)


def test_quantize_plain_floats_exact() -> None:
    x = np.array([[1.5, -0.25, 2.0**-15, 65504.0]], dtype=np.float32)
    for dtype in ("f32", "f16"):
        np.testing.assert_array_equal(dequantize(quantize(x, dtype), dtype, 1, 4), x)
    assert quantize(x[:, :2], "bf16").tolist() == [0x3FC0, 0xBE80]
    assert quantize(np.float32([1 + 2**-8, 1 + 3 * 2**-8]), "bf16").tolist() == [
        0x3F80,
        0x3F82,
    ]  # ties to even


@pytest.mark.parametrize("dtype", list(GGUF_QUANTIZERS))
def test_quantize_matches_gguf_quantizer_bytes(dtype: str) -> None:
    x = np.random.default_rng(7).standard_normal((64, 256)).astype(np.float32)
    want = gguf.quants.quantize(x, GGUF_QUANTIZERS[dtype]).reshape(-1).view(np.uint8)
    assert np.array_equal(quantize(x, dtype).view(np.uint8), want)


# ----------------------------------------------------------------------------------------------------------
# Bad input


def test_bad_sizes_and_types_are_user_errors() -> None:
    x = np.zeros((2, 288), dtype=np.float32)  # 288 values: 9 blocks of 32, not whole 256-value super-blocks
    assert quantize(x, "q50").size == 2 * 9 * 22
    with pytest.raises(DllamaError, match="multiple of the block size 256"):
        quantize(x, "q6k")
    with pytest.raises(DllamaError, match="multiple of the block size 32"):
        quantize(np.zeros((4, 48), dtype=np.float32), "q41")  # 192 values, but rows of 48
    with pytest.raises(DllamaError, match="needs 288 bytes, got 287"):
        dequantize(np.zeros(287, dtype=np.uint8), "q4k", 2, 256)
    with pytest.raises(DllamaError, match="whole number of Q6_K blocks"):
        dequantize(np.zeros(210, dtype=np.uint8), "q6k", 1, 200)
    with pytest.raises(DllamaError, match="unknown weight type 'q3k'"):
        quantize(x, "q3k")
    with pytest.raises(DllamaError, match="unknown weight type 'q2k'"):
        dequantize(np.zeros(84, dtype=np.uint8), "q2k", 1, 256)
