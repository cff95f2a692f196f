"""The forward pass as data: the per-layer op sequence and where Q80 applies."""

from __future__ import annotations

from engine.config import ModelConfig
from engine.graph import build_graph
from engine.slicing import node_slice

CFG = ModelConfig(
    arch="llama", dim=64, hidden_dim=96, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, vocab_size=288,
    context_len=64,
)


def _kinds(graph, layer: int) -> list[str]:
    return [op.kind for op in graph.ops() if op.name.startswith(f"blk.{layer}.")]


def test_layer_sequence():
    g = build_graph(CFG, node_slice(CFG, 0, 1), "f32", 64)
    attention = ["rmsnorm", "matmul", "matmul", "matmul", "rope", "rope", "kv_store", "attention", "matmul"]
    ffn = ["to_pipe", "merge_add", "rmsnorm", "matmul", "matmul", "silu_mul", "matmul", "to_pipe"]
    assert _kinds(g, 0) == attention + ffn
    assert _kinds(g, 1) == ["merge_add"] + attention + ffn
    assert [op.kind for op in g.ops()][-3:] == ["merge_add", "rmsnorm", "matmul"]


def test_q80_quantises_every_matmul_input_once():
    g = build_graph(CFG, node_slice(CFG, 0, 1), "q80", 64)
    kinds = _kinds(g, 0)
    # h is quantised once for q, k and v; then att, h again (after the FFN norm), and the SwiGLU output
    assert kinds.count("quantize_q80") == 4
    for op in g.ops():
        if op.kind == "matmul":
            assert g.buffers[op.inputs[0]].dtype == "q80", op.name
    assert "quantize_q80" not in [op.kind for op in build_graph(CFG, node_slice(CFG, 0, 1), "f32", 64).ops()]


def test_partial_sums_are_q80_only_on_the_network():
    one = build_graph(CFG, node_slice(CFG, 0, 1), "q80", 64)
    assert (one.buffers["zq"].dtype, one.buffers["zq"].width) == ("f32", 64)
    two = build_graph(CFG, node_slice(CFG, 1, 2), "q80", 64)
    assert (two.buffers["zq"].dtype, two.buffers["zq"].width) == ("q80", 128)
    assert build_graph(CFG, node_slice(CFG, 1, 2), "f32", 64).buffers["zq"].dtype == "f32"
