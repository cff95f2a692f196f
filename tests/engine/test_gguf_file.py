"""load_gguf: config from metadata, zero-copy weights, and clear errors for files it cannot run."""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
from tinymodel import write_tiny_gguf

from engine.arch import get_arch
from engine.arch.base import Meta
from engine.config import RopeScaling
from engine.errors import DllamaError
from engine.gguf_file import GGUFTensorInfo, load_gguf, read_gguf
from engine.quants import dequantize


def _root(a: np.ndarray) -> np.ndarray:
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


def _patch_tensor_type(path: Path, name: str, new_type: int) -> None:
    """Rewrite the GGML type field of tensor `name` in the header (after name, ndim and the dims)."""
    data = bytearray(path.read_bytes())
    key = struct.pack("<Q", len(name)) + name.encode()
    pos = data.index(key) + len(key)
    (ndim,) = struct.unpack_from("<I", data, pos)
    struct.pack_into("<I", data, pos + 4 + 8 * ndim, new_type)
    path.write_bytes(bytes(data))


def _patch_u32_key(path: Path, key: str, value: int) -> None:
    data = bytearray(path.read_bytes())
    k = struct.pack("<Q", len(key)) + key.encode()
    pos = data.index(k) + len(k)
    assert struct.unpack_from("<I", data, pos)[0] == gguf.GGUFValueType.UINT32
    struct.pack_into("<I", data, pos + 4, value)
    path.write_bytes(bytes(data))


def test_smollm2_config_matches_notes(smollm2_path: Path) -> None:
    m = load_gguf(smollm2_path)
    c = m.config
    assert (c.arch, c.n_layers, c.dim, c.hidden_dim) == ("llama", 30, 576, 1536)
    assert (c.n_heads, c.n_kv_heads) == (9, 3)
    assert (c.head_dim, c.vocab_size, c.context_len, c.rope_theta) == (64, 49152, 8192, 100000.0)
    assert c.norm_eps == 1e-5 and c.rope_scaling is None and not c.rope_neox
    assert m.tied and m.classifier is m.weights["token_embd.weight"]  # no output.weight in the file
    types = [w.dtype for name, w in m.weights.items() if name != "output.weight"]
    assert (types.count("q41"), types.count("f32"), m.weights["token_embd.weight"].dtype) == (210, 61, "q80")
    assert m.kind == "gguf" and m.file_size == 98_362_432
    assert m.metadata["tokenizer.ggml.bos_token_id"] == 1


def test_smollm2_weights_are_views_and_decode_like_gguf(smollm2_path: Path) -> None:
    m = load_gguf(smollm2_path)
    root = _root(m.weights["blk.0.attn_q.weight"].data)
    assert isinstance(root, np.memmap)
    for w in m.weights.values():
        assert np.shares_memory(w.data, root), w.name
    w = m.weights["blk.7.ffn_down.weight"]
    assert (w.rows, w.cols, w.data.shape) == (576, 1536, (576, 1536 // 32 * 20))
    _, infos, mm = read_gguf(smollm2_path)  # gguf.GGUFReader takes ~10 s here; the tiny tests below use it
    for name in ("blk.7.ffn_down.weight", "token_embd.weight", "blk.29.attn_k.weight", "output_norm.weight"):
        t, w = infos[name], m.weights[name]
        raw = np.asarray(mm[t.offset : t.offset + t.nbytes])
        expected = gguf.quants.dequantize(raw, t.ggml_type).reshape(t.shape[::-1])
        assert np.array_equal(dequantize(w.data, w.dtype, w.rows, w.cols), expected.reshape(w.rows, w.cols))


@pytest.mark.parametrize("wtype", ["f32", "f16", "bf16", "q80", "q40", "q41"])
def test_tiny_all_types_decode_like_gguf(tmp_path: Path, wtype: str) -> None:
    p = write_tiny_gguf(tmp_path / "t.gguf", wtype=wtype, n_layers=3)
    m = load_gguf(p)
    assert m.config.n_layers == 3 and m.config.head_dim == 16
    for t in gguf.GGUFReader(p).tensors:
        w = m.weights[t.name]
        assert w.dtype == ("f32" if len(t.shape) == 1 else wtype)
        expected = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(w.rows, w.cols)
        assert np.array_equal(dequantize(w.data, w.dtype, w.rows, w.cols), expected), t.name


def test_rope_scaling_keys_and_rope_freqs_tensor(tmp_path: Path) -> None:
    rs = RopeScaling(8.0, 1.0, 4.0, 8192)
    p = write_tiny_gguf(tmp_path / "a.gguf", rope_scaling=rs, rope_store="both", rope_theta=500000.0)
    m = load_gguf(p)
    assert m.config.rope_scaling == rs and m.config.rope_theta == 500000.0
    f = m.weights["rope_freqs.weight"]
    assert (f.dtype, f.rows, f.cols) == ("f32", 1, 8)
    assert f.data[0, 0] == 1.0 and f.data[0, -1] == 8.0  # high frequencies unscaled, low ones divided by 8
    m2 = load_gguf(write_tiny_gguf(tmp_path / "b.gguf", rope_scaling=rs, rope_store="tensor"))
    assert m2.config.rope_scaling is None and "rope_freqs.weight" in m2.weights


def test_config_fallbacks() -> None:
    base = {
        "general.architecture": "llama",
        "llama.embedding_length": 64,
        "llama.feed_forward_length": 96,
        "llama.block_count": 1,
        "llama.attention.head_count": 4,
        "llama.context_length": 32,
        "tokenizer.ggml.tokens": ["a"] * 40,
    }

    def gguf_config(meta: dict, path: str):
        return get_arch("llama").config(Meta(meta, path, "llama"))

    c = gguf_config(base, "x.gguf")
    assert (c.head_dim, c.vocab_size, c.n_kv_heads, c.rope_theta, c.norm_eps) == (16, 40, 4, 10000.0, 1e-5)
    c = gguf_config({**base, "llama.rope.dimension_count": 8, "llama.vocab_size": 50}, "x.gguf")
    assert (c.head_dim, c.vocab_size) == (8, 50)
    c = gguf_config({**base, "llama.rope.dimension_count": 8, "llama.attention.key_length": 32}, "x.gguf")
    assert c.head_dim == 32
    with pytest.raises(DllamaError, match="llama.block_count"):
        gguf_config({k: v for k, v in base.items() if k != "llama.block_count"}, "x.gguf")


def test_unsupported_architecture(tmp_path: Path) -> None:
    w = gguf.GGUFWriter(str(tmp_path / "q.gguf"), "gemma")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(DllamaError, match=r"q\.gguf: architecture 'gemma' is not supported.*llama.*qwen2"):
        load_gguf(tmp_path / "q.gguf")


def test_unsupported_tensor_type(tmp_path: Path) -> None:
    p = write_tiny_gguf(tmp_path / "t.gguf")
    _patch_tensor_type(p, "blk.1.attn_v.weight", gguf.GGMLQuantizationType.I32)  # same byte size as F32
    with pytest.raises(
        DllamaError, match=r"blk\.1\.attn_v\.weight has GGML type I32.*not supported \(F32, F16"
    ):
        load_gguf(p)


def test_missing_tensor(tmp_path: Path) -> None:
    p = write_tiny_gguf(tmp_path / "t.gguf")
    data = p.read_bytes().replace(b"blk.1.ffn_up.weight", b"blk.1.ffn_up.weighX")
    p.write_bytes(data)
    with pytest.raises(DllamaError, match=r"required tensor blk\.1\.ffn_up\.weight is missing"):
        load_gguf(p)


def test_shape_disagrees_with_config(tmp_path: Path) -> None:
    p = write_tiny_gguf(tmp_path / "t.gguf")
    _patch_u32_key(p, "llama.feed_forward_length", 128)
    with pytest.raises(DllamaError, match=r"blk\.0\.ffn_gate\.weight is 96x64.*needs 128x64"):
        load_gguf(p)


def test_truncated_and_missing_files(tmp_path: Path) -> None:
    p = write_tiny_gguf(tmp_path / "t.gguf")
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    with pytest.raises(DllamaError, match="truncated"):
        load_gguf(p)
    with pytest.raises(DllamaError, match="no such file"):
        load_gguf(tmp_path / "absent.gguf")


def test_tensor_outside_the_architecture_is_refused(tmp_path: Path) -> None:
    """A qwen2 file relabelled llama (same key lengths) carries q/k/v biases Llama has no place for."""
    p = write_tiny_gguf(tmp_path / "t.gguf", arch="qwen2")
    p.write_bytes(p.read_bytes().replace(b"qwen2", b"llama"))
    with pytest.raises(
        DllamaError, match=r"tensor blk\.0\.attn_k\.bias \(6 in all\) is not part of the llama"
    ):
        load_gguf(p)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "qwen3moe"])
def test_other_architectures_load_with_their_shapes(tmp_path: Path, arch: str) -> None:
    p = write_tiny_gguf(tmp_path / "t.gguf", arch=arch, head_dim=32 if arch != "qwen2" else None)
    m = load_gguf(p)
    c = m.config
    assert c.arch == arch and c.rope_neox and c.head_dim == (16 if arch == "qwen2" else 32)
    if arch == "qwen3moe":
        w = m.weights["blk.1.ffn_down_exps.weight"]
        assert (c.n_experts, c.n_active_experts, c.moe_hidden_dim) == (4, 2, 64)
        assert (w.experts, w.rows, w.cols) == (4, 64, 64)
    for t in gguf.GGUFReader(p).tensors:
        w = m.weights[t.name]
        assert w.shape == ((1,) if len(t.shape) == 1 else ()) + tuple(int(d) for d in t.shape[::-1]), t.name


def test_tensor_sizes_do_not_wrap() -> None:
    """2^32 x 2^32 and 2^62 x 4 values are 2^64: in int64 they wrap to 0 and would pass a bounds check."""
    for shape in ((1 << 32, 1 << 32), (1 << 62, 4)):
        info = GGUFTensorInfo("t", shape, gguf.GGMLQuantizationType.Q8_0, 0)
        assert info.nbytes == (1 << 64) // 32 * 34  # Q8_0: 34 bytes per 32 values
