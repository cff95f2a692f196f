"""What a recorded Vulkan run does, counted rather than timed: submits, dispatches and the barriers between
them, staging copies, and the bytes shaders read from host-visible memory (none on one node)."""

from __future__ import annotations

import types

import numpy as np
import pytest
from forward_checks import TOKENS, assert_matches, tiny_model
from vk_harness import Ops

from cpu_fallback.backend import CpuBackend
from engine.errors import DllamaError
from engine.graph import BufferSpec, Op, build_graph
from engine.runner import Runner
from engine.slicing import node_slice, slice_weights
from shaders import backend as vkb
from shaders.compile import spirv

VOCAB, DIM = 288, 64  # tinymodel's defaults (gqa4x2: 2 layers, 4 query heads, 2 KV heads)


def test_binding_access_reads_readonly_and_writeonly_from_spirv():
    """The read and write sets come from the shaders' qualifiers, as declared in their GLSL sources."""
    assert vkb.binding_access(spirv("rmsnorm")) == {0: (True, False), 1: (False, True), 2: (True, False)}
    assert vkb.binding_access(spirv("silu_mul")) == {0: (True, True), 1: (True, False)}
    attention = vkb.binding_access(spirv("attention"))
    assert attention == {
        0: (True, False),  # q
        1: (True, False),  # pos
        2: (True, False),  # KV slots
        3: (True, False),  # key cache
        4: (True, False),  # value cache
        5: (False, True),  # the chunks' partial results, writeonly
    }
    combine = vkb.binding_access(spirv("attention_combine"))
    assert combine == {0: (True, False), 1: (True, False), 2: (False, True)}
    with pytest.raises(DllamaError, match="not a SPIR-V module"):
        vkb.binding_access(b"\0" * 64)


@pytest.mark.parametrize(
    ("pairs", "barriers"),
    [
        ((("a", "b"), ("c", "b")), 0),  # both read b, each writes its own gate: independent
        ((("a", "b"), ("c", "a")), 1),  # the second reads a, which the first wrote (read after write)
        ((("a", "b"), ("b", "c")), 1),  # the second writes b, which the first read (write after read)
        ((("a", "b"), ("a", "c")), 1),  # both write a (write after write)
    ],
)
def test_barrier_only_between_conflicting_dispatches(vk, pairs, barriers):
    """Two silu_mul dispatches (gate = silu(gate) * up: gate read and written, up readonly), counted, and
    the results of the pair as numpy computes them in order."""
    ops = [Op("silu_mul", f"act{i}", (g, u), (g,)) for i, (g, u) in enumerate(pairs)]
    harness = Ops(vk, ops, {n: BufferSpec(32) for n in "abc"})
    assert harness.prog.counts(0, 1, 2).barriers == barriers
    rng = np.random.default_rng(3)
    values = {n: rng.standard_normal((2, 32)).astype(np.float32) for n in "abc"}
    for n, v in values.items():
        harness.write(n, v)
    harness.run(2)
    for g, u in pairs:
        values[g] = values[g] / (1 + np.exp(-values[g])) * values[u]
    for n, v in values.items():
        np.testing.assert_allclose(harness.read(n)[:2], v, rtol=1e-5, atol=1e-6)


def test_decode_token_on_one_node_is_one_submit_with_shared_barriers(tmp_path, vk):
    """Counted by hand for this graph (2 layers; f32 activations; one node, so to_pipe adds the block's
    output into x itself and merge_add records nothing), a barrier only before a dispatch that reads what a
    dispatch since the last barrier wrote (or writes what one read):
      embedding (reads tok, just copied in)                                           1 dispatch, 1 barrier
      attention block: rmsnorm, matmul q, k, v, rope q + rope k + kv_store (one fused dispatch), attention
        (chunks, then their merge), matmul wo, add into x; k and v share q's barrier (they read h, written
        before it, and write buffers untouched since)                                   9 dispatches, 7
      FFN block: rmsnorm, matmul gate + up + silu_mul (one fused dispatch), matmul down, add into x  4, 4
      classifier: rmsnorm, matmul                                                                  2, 2
    so 1 + 2 * (9 + 4) + 2 = 29 dispatches and 1 + 2 * (7 + 4) + 2 = 25 barriers. Copies: tok and pos in
    (4 bytes each), one row of logits out (288 floats)."""
    model, ref = tiny_model(tmp_path, "q40", "gqa4x2")
    runner = Runner(model, vk, "f32", max_seq_len=16, max_batch=4)
    prog, last = runner.program, len(runner.graph.segments)
    c = prog.counts(0, last, 1)
    assert (c.dispatches, c.barriers) == (29, 25)
    assert (c.transfers, c.transfer_bytes) == (3, 4 + 4 + VOCAB * 4)
    assert c.host_read_bytes == 0
    with pytest.raises(DllamaError, match="the x pipe is device-only on one node"):
        prog.pipe("x")
    prefill = prog.counts(0, last, 4)
    assert (prefill.barriers, prefill.transfer_bytes) == (25, 4 * (4 + 4 + VOCAB * 4))  # live rows only

    cpu = Runner(model, CpuBackend(2), "f32", max_seq_len=16, max_batch=4)
    got, want = [], []
    for pos, tok in enumerate(TOKENS[:4]):
        submits = prog.submits
        got.append(runner.forward([tok], pos))
        assert prog.submits - submits == 1
        want.append(cpu.forward([tok], pos))
    assert_matches(np.stack(got), np.stack(want))


def test_one_node_fuses_the_residual_add(tmp_path, vk):
    """A cluster node records to_pipe (this node's slot of zq) and merge_add (x += every slot) apart, and
    merge_add starts the next block: node 0 of 2 runs the same token in 4 more dispatches (a merge_add
    before each block but layer 0's attention) and 4 more barriers (each merge_add reads what to_pipe just
    wrote) than one node's 29 and 25."""
    model, _ = tiny_model(tmp_path, "q40", "gqa4x2")
    sl = node_slice(model.config, 0, 2)
    graph = build_graph(model.config, sl, "f32", 16)
    node0 = vk.compile(graph, slice_weights(model, sl), 4)
    c = node0.counts(0, len(graph.segments), 1)
    assert (c.dispatches, c.barriers) == (29 + 4, 25 + 4)
    one = Runner(model, vk, "f32", max_seq_len=16, max_batch=4).program
    assert one.counts(0, len(graph.segments), 1).dispatches == 29


@pytest.mark.parametrize("fused", [True, False])
def test_fused_runs_save_dispatches_and_barriers_per_decode_token(tmp_path, vk, monkeypatch, fused):
    """Q80 activations, one node, counted by hand from the op list, unfused (FUSIONS emptied) and fused:
      embedding                                                                                     1, 1
      attention block: rmsnorm, quantize h, matmul q, k, v (one barrier), rope q, rope k (one), kv_store,
        attention (2), quantize att, matmul wo, add into x                                         13, 10
        fused: rmsnorm + quantize, q, k, v, rope q + rope k + kv_store, attention (2), quantize,
        wo, add                                                                                     10, 8
      FFN block: rmsnorm, quantize h, matmul gate, up (one barrier), silu_mul, quantize gate, down, add 8, 7
        fused: rmsnorm + quantize, gate + up + silu_mul, quantize gate, down, add                    5, 5
      classifier: rmsnorm, quantize h, matmul                                                        3, 3
        fused: rmsnorm + quantize, matmul                                                            2, 2
    unfused 1 + 2 * (13 + 8) + 3 = 46 dispatches, 1 + 2 * (10 + 7) + 3 = 38 barriers; fused 1 + 2 * (10 + 5)
    + 2 = 33 and 1 + 2 * (8 + 5) + 2 = 29: 13 dispatches and 9 barriers fewer per token."""
    if not fused:
        monkeypatch.setattr(vkb, "FUSIONS", ())
    model, _ = tiny_model(tmp_path, "q40", "gqa4x2")
    runner = Runner(model, vk, "q80", max_seq_len=16, max_batch=4)
    c = runner.program.counts(0, len(runner.graph.segments), 1)
    assert (c.dispatches, c.barriers) == ((33, 29) if fused else (46, 38))


def test_cluster_node_reads_exchanged_pipes_from_host_memory(tmp_path, vk):
    """Node 0 of 2 keeps x and zq host-visible (the network fills them between segments); the first FFN
    segment's shaders read them: merge_add reads zq (2 slots of 64 floats) and x (64 floats), rmsnorm x."""
    model, _ = tiny_model(tmp_path, "q40", "gqa4x2")
    sl = node_slice(model.config, 0, 2)
    graph = build_graph(model.config, sl, "f32", 16)
    prog = vk.compile(graph, slice_weights(model, sl), 4)
    ffn = next(i for i, seg in enumerate(graph.segments) if any(op.kind == "silu_mul" for op in seg.ops))
    assert prog.counts(ffn, ffn + 1, 1).host_read_bytes == 2 * DIM * 4 + 2 * DIM * 4
    assert prog.counts(ffn, ffn + 1, 3).host_read_bytes == 3 * (2 * DIM * 4 + 2 * DIM * 4)


def test_kp_without_the_barrier_keyword_is_refused(monkeypatch):
    """A dllama kp from before barrier placement would record a barrier everywhere and copy whole pipes."""
    old = types.SimpleNamespace(__doc__="__init__(self, algorithm, push_consts)")
    fake = types.SimpleNamespace(
        OpAlgoDispatch=types.SimpleNamespace(__init__=old),
        OpTensorSyncLocal=types.SimpleNamespace(__init__=old),
    )
    monkeypatch.setitem(__import__("sys").modules, "kp", fake)
    monkeypatch.setattr(vkb.importlib.metadata, "version", lambda name: "0.9.0+dllama.000000000000")
    with pytest.raises(DllamaError, match="predates dllama's barrier placement: run tools/setup.sh"):
        vkb.import_kompute()
