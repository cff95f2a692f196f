"""convert_gguf: GGUF -> .m + .t with one vocabulary order, lossy-path warnings, rope scaling recovery;
convert: GGUF -> GGUF in another weight type."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
from tinymodel import llama31_rope_divisors, write_tiny_gguf

import engine.convert
from engine.atomic_file import atomic_write
from engine.config import RopeScaling
from engine.convert import convert, convert_gguf, rope_scaling_from_freqs
from engine.errors import DllamaError
from engine.gguf_file import load_gguf, read_gguf
from engine.mfile import read_m
from engine.quants import dequantize
from engine.tfile import read_tfile, tfile_from_gguf


def _header(path: Path) -> dict[int, int]:
    raw = path.read_bytes()
    size = struct.unpack_from("<i", raw, 4)[0]
    vals = struct.unpack_from(f"<{(size - 8) // 4}i", raw, 8)
    return dict(zip(vals[::2], vals[1::2], strict=True))


def test_tiny_q40_with_tokenizer(tmp_path: Path) -> None:
    src = write_tiny_gguf(tmp_path / "t.gguf", wtype="q40", n_layers=3)
    lines: list[str] = []
    convert_gguf(src, tmp_path / "t.m", "q40", tmp_path / "t.t", log=lines.append)
    g, m = load_gguf(src), read_m(tmp_path / "t.m")
    for name, w in g.weights.items():
        if w.dtype == "q40" and name != "token_embd.weight":  # the .m embedding is always F32
            assert m.weights[name].data.tobytes() == w.data.tobytes(), name
    embd = dequantize(g.weights["token_embd.weight"].data, "q40", 288, 64)
    assert np.array_equal(m.weights["token_embd.weight"].data, embd)
    assert read_tfile(tmp_path / "t.t") == tfile_from_gguf(g.metadata)[0]
    assert sum("layer" in s for s in lines) == 3 and not any("lossy" in s for s in lines)


def test_q41_to_q40_warns_but_q80_does_not(tmp_path: Path) -> None:
    src = write_tiny_gguf(tmp_path / "t.gguf", wtype="q41")
    lines: list[str] = []
    convert_gguf(src, tmp_path / "a.m", "q40", log=lines.append)
    assert any("warning" in s and "lossy" in s for s in lines)
    lines.clear()
    convert_gguf(src, tmp_path / "b.m", "q80", log=lines.append)
    assert not any("lossy" in s for s in lines)
    g, m = load_gguf(src), read_m(tmp_path / "b.m")
    w = g.weights["blk.0.ffn_down.weight"]
    want = dequantize(w.data, "q41", w.rows, w.cols)
    got = dequantize(m.weights["blk.0.ffn_down.weight"].data, "q80", w.rows, w.cols)
    assert np.abs(got - want).max() <= np.abs(want).max() / 127  # within one Q80 step


def test_rope_scaling_recovered_from_rope_freqs(tmp_path: Path) -> None:
    rs = RopeScaling(8.0, 1.0, 4.0, 8192)
    src = write_tiny_gguf(tmp_path / "t.gguf", rope_scaling=rs, rope_store="tensor", rope_theta=500000.0)
    convert_gguf(src, tmp_path / "t.m", "f32", log=lambda s: None)
    h = _header(tmp_path / "t.m")
    assert (h[12], h[14], h[15], h[16], h[17], h[18]) == (500000, 8, 1, 4, 8192, 2)


def test_nonstandard_rope_freqs_recover_equivalent_integer_parameters(tmp_path: Path) -> None:
    rs = RopeScaling(8.0, 1.0, 4.0, 64)  # only orig/low and orig/high are determined by the tensor
    src = write_tiny_gguf(tmp_path / "t.gguf", rope_scaling=rs, rope_store="tensor")
    convert_gguf(src, tmp_path / "t.m", "f32", log=lambda s: None)
    got = read_m(tmp_path / "t.m").config.rope_scaling
    assert got is not None and got.factor == 8.0
    assert all(float(v).is_integer() for v in (got.low_freq_factor, got.high_freq_factor))
    expected = llama31_rope_divisors(16, 10000.0, rs)
    assert np.allclose(llama31_rope_divisors(16, 10000.0, got), expected, rtol=1e-6)


def test_rope_freqs_that_break_the_rule(tmp_path: Path) -> None:
    assert rope_scaling_from_freqs(np.ones(8), 16, 10000.0) is None
    with pytest.raises(DllamaError, match="has 4 values, head_dim 16 needs 8"):
        rope_scaling_from_freqs(np.ones(4), 16, 10000.0)
    with pytest.raises(DllamaError, match="does not follow the Llama 3.1"):
        rope_scaling_from_freqs(np.array([1, 3, 2, 5, 4, 8, 6, 8.0]), 16, 10000.0)
    rs = RopeScaling(8.0, 1.0, 4.0, 8192)
    src = write_tiny_gguf(tmp_path / "t.gguf", rope_scaling=rs, rope_store="tensor")
    _, infos, _ = read_gguf(src)
    data = bytearray(src.read_bytes())
    off = infos["rope_freqs.weight"].offset
    data[off : off + 32] = np.array([1, 2, 1, 2, 1, 2, 1, 2], dtype="<f4").tobytes()
    src.write_bytes(bytes(data))
    with pytest.raises(DllamaError, match=r"t\.gguf: rope_freqs\.weight does not follow"):
        convert_gguf(src, tmp_path / "t.m", "f32", log=lambda s: None)
    assert not (tmp_path / "t.m").exists()


def test_non_integer_header_floats_warn(tmp_path: Path) -> None:
    src = write_tiny_gguf(tmp_path / "t.gguf", rope_theta=10000.5)
    lines: list[str] = []
    convert_gguf(src, tmp_path / "t.m", "f16", log=lines.append)
    assert any("rope_theta 10000.5 is stored as 10000" in s for s in lines)
    assert _header(tmp_path / "t.m")[12] == 10000


def test_bad_weight_type(tmp_path: Path) -> None:
    src = write_tiny_gguf(tmp_path / "t.gguf")
    with pytest.raises(DllamaError, match="'q41' is not one of f32, f16, q40, q80"):
        convert_gguf(src, tmp_path / "t.m", "q41")
    assert not (tmp_path / "t.m").exists()


def test_smollm2_vocab_order_shared_by_m_and_t(tmp_path: Path, smollm2_path: Path) -> None:
    convert_gguf(smollm2_path, tmp_path / "s.m", "q80", tmp_path / "s.t", log=lambda s: None)
    g, m, tf = load_gguf(smollm2_path), read_m(tmp_path / "s.m"), read_tfile(tmp_path / "s.t")
    tokens = g.metadata["tokenizer.ggml.tokens"]
    ge = g.weights["token_embd.weight"].data
    for text, old in (("<|im_start|>", 1), ("<|endoftext|>", 0), ("Ġthe", tokens.index("Ġthe"))):
        new = tf.vocab.index(text.replace("Ġ", " ").encode())
        assert np.array_equal(m.weights["token_embd.weight"].data[new], dequantize(ge[old], "q80", 1, 576)[0])
        assert m.weights["output.weight"].data[new].tobytes() == ge[old].tobytes()  # tied, q80 copied
    assert tf.vocab[tf.bos_id] == b"<|im_start|>" and tf.bos_id == 49152 - 17
    assert m.config.vocab_size == 49152 and m.config.n_layers == 30


def test_qwen2_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    src = write_tiny_gguf(tmp_path / "q.gguf", arch="qwen2")
    lines: list[str] = []
    with pytest.raises(DllamaError, match="has no qwen2 architecture"):
        convert_gguf(src, tmp_path / "q.m", "q40", tmp_path / "q.t", log=lines.append)
    assert lines == [] and sorted(p.name for p in tmp_path.iterdir()) == ["q.gguf"]


@pytest.mark.parametrize("arch", ["qwen3", "qwen3moe"])
def test_qwen3_ggufs_with_k_quants_convert_to_m(tmp_path: Path, arch: str) -> None:
    """Every tensor of the .m (matrices re-encoded from Q6_K/Q4_K to f32) decodes to the GGUF's values."""
    types = {"ffn_down_exps" if arch == "qwen3moe" else "ffn_down": "q6k", "attn_q": "q4k"}
    shape = dict(dim=256, hidden_dim=512, head_dim=64, moe_hidden_dim=256)
    src = write_tiny_gguf(tmp_path / "q.gguf", arch=arch, wtype="q50", types=types, **shape)
    convert_gguf(src, tmp_path / "q.m", "f32", log=lambda line: None)
    g, m = load_gguf(src), read_m(tmp_path / "q.m")
    assert (
        m.config == g.config
        and _header(tmp_path / "q.m")[1] == {"qwen3": 0xABCD01, "qwen3moe": 0xABCD02}[arch]
    )
    assert set(m.weights) == set(g.weights)
    for name, w in g.weights.items():
        rows = w.rows * max(w.experts, 1)
        want = dequantize(w.data.reshape(rows, -1), w.dtype, rows, w.cols)
        got = m.weights[name].data.reshape(rows, w.cols)
        assert np.array_equal(got, want), name


@pytest.mark.parametrize("failure", [DllamaError("disk full"), KeyboardInterrupt()], ids=["error", "Ctrl-C"])
def test_a_failed_t_leaves_neither_file_written(tmp_path: Path, monkeypatch, failure: BaseException) -> None:
    """The .m and the .t land together: a failure while writing the .t keeps the old .m and leaves no temp."""
    src = write_tiny_gguf(tmp_path / "t.gguf")
    (tmp_path / "t.m").write_bytes(b"the previous model")

    def broken_write(path, tf) -> None:
        with atomic_write(path) as f:
            f.write(b"half a tokenizer")
            raise failure

    monkeypatch.setattr(engine.convert, "write_tfile", broken_write)
    with pytest.raises(type(failure)):
        convert_gguf(src, tmp_path / "t.m", "f32", tmp_path / "t.t", log=lambda s: None)
    assert (tmp_path / "t.m").read_bytes() == b"the previous model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.gguf", "t.m"]


def test_outputs_are_checked_before_any_work(tmp_path: Path) -> None:
    src = write_tiny_gguf(tmp_path / "t.gguf")
    os.mkfifo(tmp_path / "fifo")
    lines: list[str] = []
    for out_m, out_t, message in (
        (tmp_path / "fifo", None, r"is a FIFO \(named pipe\), not a regular file"),
        (tmp_path / "t.m", tmp_path, "is a directory, not a regular file"),
        (tmp_path / "t.m", tmp_path / "t.m", "the .m and the .t outputs are the same file"),
        (src, None, "is both the source and an output"),
    ):
        with pytest.raises(DllamaError, match=message):
            convert_gguf(src, out_m, "f32", out_t, log=lines.append)
    assert lines == [] and sorted(p.name for p in tmp_path.iterdir()) == ["fifo", "t.gguf"]


# ---- GGUF outputs ----------------------------------------------------------------------------------------


def _gguf_values(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF decoded by the gguf package's own reader and decoder."""
    return {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in gguf.GGUFReader(str(path)).tensors}


@pytest.mark.parametrize("arch", ["llama", "qwen3moe"])
def test_gguf_to_gguf_keeps_every_value(tmp_path: Path, arch: str) -> None:
    """A K-quant mix re-written as F32 (the router and rope_freqs included) decodes to the source's values;
    a tied classifier stays absent and the config reads back the same."""
    types = {"ffn_down_exps" if arch == "qwen3moe" else "ffn_down": "q6k", "attn_q": "q4k"}
    shape = dict(dim=256, hidden_dim=512, head_dim=64, moe_hidden_dim=256)
    rs = RopeScaling(8.0, 1.0, 4.0, 8192) if arch == "llama" else None
    extra = dict(tied=True, rope_scaling=rs, rope_store="tensor", **shape)
    src = write_tiny_gguf(tmp_path / "q.gguf", arch=arch, wtype="q50", types=types, **extra)
    convert(src, tmp_path / "f.gguf", "f32", log=lambda s: None)
    want, got = _gguf_values(src), _gguf_values(tmp_path / "f.gguf")
    assert set(got) == set(want) and "output.weight" not in got
    for name, values in want.items():
        assert np.array_equal(got[name], values), name
    assert load_gguf(tmp_path / "f.gguf").config == load_gguf(src).config


def test_gguf_output_refuses_a_t_and_its_own_source(tmp_path: Path) -> None:
    src = write_tiny_gguf(tmp_path / "t.gguf")
    with pytest.raises(DllamaError, match="carries its own tokenizer"):
        convert(src, tmp_path / "o.gguf", "q80", tmp_path / "o.t", log=lambda s: None)
    with pytest.raises(DllamaError, match="is both the source and the output"):
        convert(src, src, "q80", log=lambda s: None)
    with pytest.raises(DllamaError, match="'q7' is not one of"):
        convert(src, tmp_path / "o.gguf", "q7", log=lambda s: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.gguf"]


def test_matrices_of_partial_blocks_fall_back_as_llama_cpp_does(tmp_path: Path) -> None:
    """Q4_K needs 256-value rows: a 64-wide model's matrices are written Q8_0, with one warning line."""
    src = write_tiny_gguf(tmp_path / "t.gguf", wtype="f32")
    lines: list[str] = []
    convert(src, tmp_path / "k.gguf", "q4k", log=lines.append)
    kinds = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "k.gguf")).tensors}
    assert kinds["blk.0.attn_q.weight"] == "Q8_0" and kinds["blk.0.attn_norm.weight"] == "F32"
    assert sum("not whole q4k blocks" in s for s in lines) == 1
