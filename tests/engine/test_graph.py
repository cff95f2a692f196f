"""The forward pass as data: the per-layer op sequence and where Q80 applies."""

from __future__ import annotations

from engine.config import ModelConfig
from engine.graph import build_graph
from engine.slicing import node_slice

CFG = ModelConfig(
    arch="llama",
    dim=64,
    hidden_dim=96,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    head_dim=16,
    vocab_size=288,
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


QWEN3MOE = ModelConfig(
    arch="qwen3moe",
    dim=64,
    hidden_dim=0,
    n_layers=2,
    n_heads=4,
    n_kv_heads=2,
    head_dim=32,
    vocab_size=288,
    context_len=64,
    rope_neox=True,
    n_experts=4,
    n_active_experts=2,
    moe_hidden_dim=64,
)


def test_qwen2_adds_the_qkv_biases_after_their_matmuls():
    cfg = ModelConfig(**{**CFG.__dict__, "arch": "qwen2", "rope_neox": True})
    ops = [
        op for op in build_graph(cfg, node_slice(cfg, 0, 1), "f32", 64).ops() if op.name.startswith("blk.0.")
    ]
    kinds = [op.kind for op in ops]
    assert kinds[1:7] == ["matmul", "add_bias", "matmul", "add_bias", "matmul", "add_bias"]
    assert [op.weight for op in ops if op.kind == "add_bias"] == [f"blk.0.attn_{t}.bias" for t in "qkv"]
    assert all(op.params["neox"] for op in ops if op.kind == "rope")


def test_qwen3_normalises_q_and_k_per_head_before_rope():
    cfg = ModelConfig(**{**CFG.__dict__, "arch": "qwen3", "head_dim": 32, "rope_neox": True})
    g = build_graph(cfg, node_slice(cfg, 0, 1), "f32", 64)
    ops = [op for op in g.ops() if op.name.startswith("blk.1.")]
    kinds = [op.kind for op in ops]
    i = kinds.index("rope")
    assert kinds[i - 2 : i] == ["rmsnorm", "rmsnorm"] and "add_bias" not in kinds
    assert [(op.inputs, op.outputs, op.weight) for op in ops[i - 2 : i]] == [
        (("q",), ("q",), "blk.1.attn_q_norm.weight"),
        (("k",), ("k",), "blk.1.attn_k_norm.weight"),
    ]
    assert g.buffers["q"].width == 4 * 32  # head_dim 32 although dim / heads is 16


def test_qwen3moe_ffn_routes_each_token_to_its_experts():
    g = build_graph(QWEN3MOE, node_slice(QWEN3MOE, 1, 2), "q80", 64)
    ffn = [op for op in g.ops() if op.name.startswith("blk.0.")][-10:]
    assert [op.kind for op in ffn] == [
        "matmul",
        "moe_route",
        "quantize_q80",
        "moe_matmul",
        "moe_matmul",
        "silu_mul",
        "quantize_q80",
        "moe_matmul",
        "moe_sum",
        "to_pipe",
    ]
    router, route = ffn[0], ffn[1]
    assert router.inputs == ("h",) and router.weight == "blk.0.ffn_gate_inp.weight"  # f32 input
    assert route.params == {"k": 2, "normalize": True}
    assert [op.inputs[1] for op in ffn if op.kind == "moe_matmul"] == ["moe_idx"] * 3
    # node 1 of 2 holds 32 of the 64 rows of every expert; the two routed slots side by side
    assert (g.buffers["moe_gate"].width, g.buffers["moe_y"].width, g.buffers["moe_idx"].dtype) == (
        64,
        128,
        "i32",
    )
