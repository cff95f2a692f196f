"""engine.quants against the original project's golden bytes, hand-computed blocks and gguf's own codecs."""

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


def test_q40_q80_match_gguf_quantizers_on_random_data() -> None:
    x = np.random.default_rng(7).standard_normal((64, 256)).astype(np.float32)
    assert np.array_equal(quantize_q40(x), gguf.quants.quantize(x, GT.Q4_0).reshape(-1))
    assert np.array_equal(quantize_q80(x), gguf.quants.quantize(x, GT.Q8_0).reshape(-1))


@pytest.mark.parametrize(
    ("dtype", "gt"), [("q40", GT.Q4_0), ("q41", GT.Q4_1), ("q80", GT.Q8_0), ("bf16", GT.BF16)]
)
def test_dequantize_matches_gguf(dtype: str, gt: GT) -> None:
    x = (np.random.default_rng(3).standard_normal((24, 96)) * 0.7).astype(np.float32)
    q = gguf.quants.quantize(x, gt)
    got = dequantize(q, dtype, 24, 96)
    assert got.shape == (24, 96) and got.dtype == np.float32
    assert np.array_equal(got, gguf.quants.dequantize(q, gt).reshape(24, 96))
    assert np.abs(got - x).max() < 0.2  # and it is a decoding of x, not of something else


def test_dequantize_f32_f16() -> None:
    x = np.random.default_rng(4).standard_normal((3, 8)).astype(np.float32)
    assert np.array_equal(dequantize(x, "f32", 3, 8), x)
    half = x.astype(np.float16)
    assert np.array_equal(dequantize(half, "f16", 3, 8), half.astype(np.float32))


def test_quantize_dispatch_round_trip() -> None:
    x = np.random.default_rng(5).standard_normal((4, 64)).astype(np.float32)
    for dtype, tol in (("f32", 0.0), ("f16", 2e-3), ("q80", 0.03), ("q40", 0.5)):
        assert np.abs(dequantize(quantize(x, dtype), dtype, 4, 64) - x).max() <= tol
    with pytest.raises(DllamaError, match="q41"):
        quantize(x, "q41")
