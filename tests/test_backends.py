"""Every op kind the graph can emit has a kernel in both backends (llama.cpp's test-backend-ops rule)."""

from __future__ import annotations

import itertools

import pytest

from cpu_fallback.backend import OP_KINDS as CPU_OPS
from engine.arch import registry
from engine.config import ModelConfig
from engine.graph import OP_KINDS, build_graph
from engine.slicing import node_slice
from shaders.backend import OP_KINDS as VULKAN_OPS


def _config(arch: str) -> ModelConfig:
    moe = dict(n_experts=4, n_active_experts=2, moe_hidden_dim=64) if arch == "qwen3moe" else {}
    return ModelConfig(
        arch=arch,
        dim=64,
        hidden_dim=96,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=16,
        vocab_size=288,
        context_len=64,
        rope_neox=arch != "llama",
        **moe,
    )


def emitted_kinds() -> set[str]:
    """Op kinds of every architecture's graph, for root and worker nodes and both activation types."""
    kinds = set()
    for arch, act, (node, n_nodes) in itertools.product(registry(), ("f32", "q80"), ((0, 1), (1, 2))):
        cfg = _config(arch)
        kinds |= {op.kind for op in build_graph(cfg, node_slice(cfg, node, n_nodes), act, 64).ops()}
    return kinds


def test_the_graph_emits_only_declared_kinds_and_uses_them_all():
    assert emitted_kinds() == set(OP_KINDS)


@pytest.mark.parametrize(("backend", "kinds"), [("cpu", CPU_OPS), ("vulkan", VULKAN_OPS)])
def test_every_backend_implements_every_kind(backend: str, kinds: frozenset[str]):
    missing = sorted(set(OP_KINDS) - set(kinds))
    assert not missing, f"the {backend} backend lacks {missing}"
