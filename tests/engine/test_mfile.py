"""`.m` files: GGUF -> .m -> read_m round trips, the header and tensor stream parsed independently, errors."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import pytest
from tinymodel import tiny_weights, write_tiny_gguf

import engine.mfile
from engine.config import RopeScaling
from engine.errors import DllamaError
from engine.gguf_file import load_gguf
from engine.mfile import read_m, write_m
from engine.quants import dequantize, quantize_q40

TINY = dict(dim=64, hidden_dim=96, n_layers=2, n_heads=4, n_kv_heads=2, vocab=288)
# spec 1.2 key numbers and 1.5 converter order
CONVERTER_ORDER = [0, 1, 11, 2, 3, 4, 5, 6, 13, 10, 9, 7, 8, 12, 19, 20]
SCALED_ORDER = [0, 1, 11, 2, 3, 4, 5, 6, 13, 10, 9, 7, 8, 12, 14, 15, 16, 17, 18, 19, 20]


def _pairs(path: Path) -> tuple[list[tuple[int, int]], int]:
    raw = path.read_bytes()
    magic, size = struct.unpack_from("<ii", raw, 0)
    assert magic == 0x0A00ABCD
    vals = struct.unpack_from(f"<{(size - 8) // 4}i", raw, 8)
    return list(zip(vals[::2], vals[1::2], strict=True)), size


def _m_file(path: Path, pairs: list[tuple[int, int]], payload: bytes = b"", magic: int = 0x0A00ABCD) -> Path:
    head = struct.pack("<ii", magic, 8 + 8 * len(pairs))
    path.write_bytes(head + b"".join(struct.pack("<ii", k, v) for k, v in pairs) + payload)
    return path


def _all_decoded(model) -> dict[str, np.ndarray]:
    out = {n: dequantize(w.data, w.dtype, w.rows, w.cols) for n, w in model.weights.items()}
    c = model.classifier
    out["output.weight"] = dequantize(c.data, c.dtype, c.rows, c.cols)
    return out


@pytest.mark.parametrize(("gguf_type", "mtype"), [("f32", "f32"), ("q40", "q40"), ("q80", "q80")])
def test_round_trip_same_block_type(tmp_path: Path, gguf_type: str, mtype: str) -> None:
    g = load_gguf(write_tiny_gguf(tmp_path / "t.gguf", wtype=gguf_type))
    write_m(tmp_path / "t.m", g, mtype)
    m = read_m(tmp_path / "t.m")
    assert m.kind == "m" and m.config == g.config
    want, got = _all_decoded(g), _all_decoded(m)
    assert set(got) == set(want)
    for name in got:
        assert np.array_equal(got[name], want[name]), name
    for name, w in m.weights.items():
        expected = "f32" if name == "token_embd.weight" or w.rows == 1 else mtype
        assert w.dtype == expected, name
        if w.dtype == g.weights[name].dtype:  # same block type: the very bytes of the GGUF
            assert w.data.tobytes() == g.weights[name].data.tobytes(), name


def test_header_and_stream_parsed_independently(tmp_path: Path) -> None:
    write_m(tmp_path / "t.m", load_gguf(write_tiny_gguf(tmp_path / "t.gguf", rope_theta=500000.0)), "f32")
    pairs, header_size = _pairs(tmp_path / "t.m")
    assert [k for k, _ in pairs] == CONVERTER_ORDER
    assert dict(pairs) == {
        0: 0,
        1: 0xABCD00,
        11: 1,
        2: 64,
        3: 96,
        4: 2,
        5: 4,
        6: 2,
        13: 0,
        10: 256,
        9: 288,
        7: 0,
        8: 0,
        12: 500000,
        19: 16,
        20: 5,
    }
    ref = tiny_weights(**TINY, seed=0, tied=False)
    # spec 1.4: embedding, per layer wq wk wv wo w1(gate) w2(down) w3(up) attn_norm ffn_norm, norm, wcls
    order = ["token_embd"]
    for layer in range(2):
        names = (
            "attn_q",
            "attn_k",
            "attn_v",
            "attn_output",
            "ffn_gate",
            "ffn_down",
            "ffn_up",
            "attn_norm",
            "ffn_norm",
        )
        order += [f"blk.{layer}.{t}" for t in names]
    order += ["output_norm", "output"]
    raw = (tmp_path / "t.m").read_bytes()
    pos = header_size
    for name in order:
        expected = ref[name + ".weight"]
        got = np.frombuffer(raw, dtype="<f4", count=expected.size, offset=pos)
        assert np.array_equal(got, expected.reshape(-1)), name
        pos += expected.size * 4
    assert pos == len(raw)


def test_rope_scaling_header_keys(tmp_path: Path) -> None:
    rs = RopeScaling(8.0, 1.0, 4.0, 8192)
    g = load_gguf(write_tiny_gguf(tmp_path / "t.gguf", rope_scaling=rs, rope_theta=500000.0))
    write_m(tmp_path / "t.m", g, "q80")
    pairs, _ = _pairs(tmp_path / "t.m")
    assert [k for k, _ in pairs] == SCALED_ORDER
    h = dict(pairs)
    assert (h[13], h[12], h[14], h[15], h[16], h[17], h[18]) == (3, 500000, 8, 1, 4, 8192, 2)
    assert read_m(tmp_path / "t.m").config.rope_scaling == rs


def test_q41_and_bf16_are_reencoded(tmp_path: Path) -> None:
    g = load_gguf(write_tiny_gguf(tmp_path / "t.gguf", wtype="q41"))
    write_m(tmp_path / "t.m", g, "f32")
    got, want = _all_decoded(read_m(tmp_path / "t.m")), _all_decoded(g)
    assert all(np.array_equal(got[n], want[n]) for n in got)  # q41 -> f32 is exact
    g = load_gguf(write_tiny_gguf(tmp_path / "b.gguf", wtype="bf16"))
    write_m(tmp_path / "b.m", g, "q40")
    m = read_m(tmp_path / "b.m")
    w = g.weights["blk.1.ffn_up.weight"]
    values = dequantize(w.data, "bf16", w.rows, w.cols)
    # spec 2.1 rule (checked against the golden bytes in test_quants); gguf's Q4_0 differs on |min| = max
    # ties, which bf16 values do produce
    expected = quantize_q40(values)
    assert m.weights["blk.1.ffn_up.weight"].data.tobytes() == expected.tobytes()


def test_tied_and_vocab_order(tmp_path: Path) -> None:
    g = load_gguf(write_tiny_gguf(tmp_path / "t.gguf", tied=True, wtype="q80"))
    order = np.random.default_rng(1).permutation(288)
    write_m(tmp_path / "t.m", g, "q80", vocab_order=order)
    m = read_m(tmp_path / "t.m")
    embd = dequantize(g.weights["token_embd.weight"].data, "q80", 288, 64)
    assert np.array_equal(m.weights["token_embd.weight"].data, embd[order])
    assert m.weights["output.weight"].data.tobytes() == g.weights["token_embd.weight"].data[order].tobytes()
    with pytest.raises(DllamaError, match="permutation"):
        write_m(tmp_path / "u.m", g, "q80", vocab_order=np.zeros(288, dtype=np.int64))


def test_weights_are_views(tmp_path: Path) -> None:
    write_m(tmp_path / "t.m", load_gguf(write_tiny_gguf(tmp_path / "t.gguf", wtype="q40")), "q40")
    m = read_m(tmp_path / "t.m")
    root = m.weights["token_embd.weight"].data
    while isinstance(root.base, np.ndarray):
        root = root.base
    assert isinstance(root, np.memmap)
    assert all(np.shares_memory(w.data, root) for w in m.weights.values())


def test_exact_size_check(tmp_path: Path) -> None:
    write_m(tmp_path / "t.m", load_gguf(write_tiny_gguf(tmp_path / "t.gguf", wtype="q40")), "q40")
    good = (tmp_path / "t.m").read_bytes()
    n = len(good)
    (tmp_path / "long.m").write_bytes(good + b"\0")
    with pytest.raises(DllamaError, match=rf"long\.m: .*need {n} bytes, the file has {n + 1}"):
        read_m(tmp_path / "long.m")
    (tmp_path / "short.m").write_bytes(good[:-1])
    with pytest.raises(DllamaError, match=rf"short\.m: .*need {n} bytes, the file has {n - 1} \(truncated\)"):
        read_m(tmp_path / "short.m")


BASE = [(0, 0), (1, 0xABCD00), (2, 64), (3, 96), (4, 1), (5, 4), (6, 4), (9, 32), (10, 64), (13, 0)]


@pytest.mark.parametrize(
    ("pairs", "magic", "message"),
    [
        (BASE, 0xABCD00, "old model format"),
        (BASE, 0xABCD01, "old model format"),
        (BASE, 0x12345678, "not a distributed-llama .m file"),
        ([*BASE, (22, 1)], 0x0A00ABCD, "unsupported .m header key 22"),
        ([p for p in BASE if p[0] != 13], 0x0A00ABCD, "does not specify the weight type"),
        ([*BASE, (20, 7)], 0x0A00ABCD, "norm_epsilon code 7"),
        (
            [(k, 0xABCD03 if k == 1 else v) for k, v in BASE],
            0x0A00ABCD,
            r"unknown architecture 0xabcd03.*qwen3",
        ),
        ([*BASE, (7, 8), (8, 2), (21, 32)], 0x0A00ABCD, r"8 experts \(2 active\) do not fit the llama"),
        ([(k, 0xABCD02 if k == 1 else v) for k, v in BASE], 0x0A00ABCD, r"0 experts \(0 active\) do not fit"),
        (
            [(k, 0xABCD02 if k == 1 else v) for k, v in [*BASE, (7, 2), (8, 3), (21, 32)]],
            0x0A00ABCD,
            r"2 experts \(3 active\) do not fit the qwen3moe",
        ),
    ],
)
def test_header_errors(tmp_path: Path, pairs: list[tuple[int, int]], magic: int, message: str) -> None:
    p = _m_file(tmp_path / "bad.m", pairs, magic=magic)
    with pytest.raises(DllamaError, match=message):
        read_m(p)


def test_hand_built_file_with_falcon_rope_and_defaults(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    dim, hidden, vocab = 32, 64, 8
    tensors = [rng.standard_normal((vocab, dim))]
    shapes = [(dim, dim)] * 4 + [(hidden, dim), (dim, hidden), (hidden, dim), (dim,), (dim,)]
    tensors += [rng.standard_normal(s) for s in shapes]
    tensors += [rng.standard_normal(dim), rng.standard_normal((vocab, dim))]
    payload = b"".join(t.astype("<f4").tobytes() for t in tensors)
    pairs = [(1, 0xABCD00), (2, dim), (3, hidden), (4, 1), (5, 2), (6, 2), (9, vocab), (10, 16), (13, 0)]
    pairs.append((18, 1))  # rope_type FALCON
    m = read_m(_m_file(tmp_path / "h.m", pairs, payload))
    c = m.config
    assert c.rope_neox and c.head_dim == 16 and c.norm_eps == 1e-5 and c.rope_theta == 10000.0
    assert c.rope_scaling is None
    assert np.array_equal(m.weights["blk.0.ffn_down.weight"].data, tensors[6].astype(np.float32))
    assert np.array_equal(m.weights["output.weight"].data, tensors[-1].astype(np.float32))


def test_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    g = load_gguf(write_tiny_gguf(tmp_path / "t.gguf"))
    target = tmp_path / "out.m"
    target.write_bytes(b"previous")
    calls = []
    real = engine.mfile._write_matrix

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine.mfile, "_write_matrix", failing)
    with pytest.raises(DllamaError, match="out.m: cannot write"):
        write_m(target, g, "f32")
    assert target.read_bytes() == b"previous"
    assert sorted(os.listdir(tmp_path)) == ["out.m", "t.gguf"]
    monkeypatch.undo()
    write_m(tmp_path / "new.m", g, "f32")
    assert sorted(os.listdir(tmp_path)) == ["new.m", "out.m", "t.gguf"]
    with pytest.raises(DllamaError, match="q41"):
        write_m(tmp_path / "x.m", g, "q41")
    assert not (tmp_path / "x.m").exists()
