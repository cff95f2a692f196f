"""Numpy reference codecs for the weight encodings (spec section 2): for converters and tests, not kernels."""

from __future__ import annotations

import numpy as np

from engine.errors import DllamaError
from engine.weights import BLOCK, BLOCK_BYTES, WEIGHT_TYPES


def _blocks(x: np.ndarray, what: str) -> np.ndarray:
    flat = np.asarray(x, dtype=np.float32).reshape(-1)
    if flat.size % BLOCK:
        raise DllamaError(f"{what}: {flat.size} values is not a multiple of the block size {BLOCK}")
    return flat.reshape(-1, BLOCK)


def _pack(d: np.ndarray, payload: np.ndarray, block_bytes: int) -> np.ndarray:
    out = np.empty((d.shape[0], block_bytes), dtype=np.uint8)
    out[:, :2] = d.astype("<f2").view(np.uint8).reshape(-1, 2)
    out[:, 2:] = payload
    return out.reshape(-1)


def quantize_q40(x: np.ndarray) -> np.ndarray:
    """distributed-llama Q40 (= GGUF Q4_0): per block d = m / -8, m the signed extreme; 18 bytes per block."""
    g = _blocks(x, "Q40 quantisation")
    gmax, gmin = g.max(axis=1), g.min(axis=1)
    d = np.where(-gmin > gmax, gmin, gmax) / np.float32(-8.0)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, np.float32(1.0) / d, np.float32(0.0)).astype(np.float32)
    q = np.clip(np.trunc(g * inv[:, None] + np.float32(8.5)), 0, 15).astype(np.uint8)
    return _pack(d, q[:, :16] | (q[:, 16:] << 4), BLOCK_BYTES["q40"])


def quantize_q80(x: np.ndarray) -> np.ndarray:
    """distributed-llama Q80 (= GGUF Q8_0): d = max|x| / 127, q = round-half-even(x / d); 34 bytes a block."""
    g = _blocks(x, "Q80 quantisation")
    d = np.abs(g).max(axis=1) / np.float32(127.0)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, np.float32(1.0) / d, np.float32(0.0)).astype(np.float32)
    q = np.round(g * inv[:, None]).astype(np.int8)
    return _pack(d, q.view(np.uint8), BLOCK_BYTES["q80"])


def quantize(x: np.ndarray, dtype: str) -> np.ndarray:
    """Encode float values as `dtype` (f32, f16, q40 or q80) in the Weight data layout, flattened."""
    if dtype == "f32":
        return np.asarray(x, dtype=np.float32).reshape(-1)
    if dtype == "f16":
        return np.asarray(x, dtype=np.float32).astype(np.float16).reshape(-1)
    if dtype == "q40":
        return quantize_q40(x)
    if dtype == "q80":
        return quantize_q80(x)
    raise DllamaError(f"cannot encode weights as {dtype!r} (supported: f32, f16, q40, q80)")


def _scale(blocks: np.ndarray, start: int) -> np.ndarray:
    return np.ascontiguousarray(blocks[:, start : start + 2]).view("<f2").astype(np.float32).reshape(-1)


def dequantize(data: np.ndarray, dtype: str, rows: int, cols: int) -> np.ndarray:
    """Decode a tensor stored as `dtype` (Weight.data layout) into float32 (rows, cols)."""
    if dtype not in WEIGHT_TYPES:
        raise DllamaError(f"unknown weight type {dtype!r} (supported: {', '.join(WEIGHT_TYPES)})")
    n = rows * cols
    if dtype == "f32":
        return np.asarray(data).reshape(-1).view(np.float32).reshape(rows, cols).copy()
    if dtype == "f16":
        return np.asarray(data).reshape(-1).view(np.float16).astype(np.float32).reshape(rows, cols)
    if dtype == "bf16":
        bits = np.asarray(data).reshape(-1).view(np.uint16).astype(np.uint32) << 16
        return bits.view(np.float32).reshape(rows, cols)
    if cols % BLOCK:
        raise DllamaError(f"{dtype} tensor with {cols} columns: not a multiple of the block size {BLOCK}")
    b = np.asarray(data).reshape(-1).view(np.uint8).reshape(n // BLOCK, BLOCK_BYTES[dtype])
    d = _scale(b, 0)[:, None]
    if dtype == "q80":
        out = b[:, 2:].view(np.int8).astype(np.float32) * d
    else:
        qs = b[:, -16:]
        nib = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)
        out = (nib - 8.0) * d if dtype == "q40" else nib * d + _scale(b, 2)[:, None]
    return out.reshape(rows, cols)
