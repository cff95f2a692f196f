"""Run by test_sync.py under the Khronos validation layer: forward passes (one node's fused submissions and a
cluster node's per-segment ones), then a deliberate hazard.

Usage: python vk_sync_script.py MODEL.gguf. Everything the layer reports before the CONTROL line comes from
the engine; the control proves that the layer and its synchronisation checks are live in this process.
"""

from __future__ import annotations

import sys

import numpy as np

from engine.graph import BufferSpec, Graph, Op, Segment
from engine.model_file import open_model
from engine.runner import Runner, run_graph
from engine.slicing import node_slice
from shaders.backend import Tuning, VulkanBackend, VulkanProgram

TOKENS = [5, 17, 200, 3, 99, 42, 7, 150, 11]


def conflicts(cfg, be: VulkanBackend) -> None:
    """Dispatch pairs whose only conflict is a write after a read, a read after a write, a write after a
    write, or none (gate = silu(gate) * up: gate read and written, up readonly)."""
    buffers = {n: BufferSpec(32) for n in ("tok", "pos", "zq", "a", "b", "c")}
    for pairs in (
        (("a", "b"), ("b", "c")),
        (("a", "b"), ("c", "a")),
        (("a", "b"), ("a", "c")),
        (("a", "b"), ("c", "b")),
    ):
        ops = [Op("silu_mul", f"act{i}", (g, u), (g,)) for i, (g, u) in enumerate(pairs)]
        graph = Graph(cfg, node_slice(cfg, 0, 1), "f32", 8, buffers, [Segment(ops)])
        prog = VulkanProgram(be, graph, {}, 2)
        prog.run_segment(0, 2)
        prog.run_segment(0, 2)
        print(f"ran conflict pair {pairs}", flush=True)


def main(path: str) -> None:
    model = open_model(path)
    gpu_split = Tuning(split=True, rows=2, batch=2, reduce_wg=128)
    gpu_tiles = Tuning(split=True, rows=2, batch=2, reduce_wg=128, matvec_wg=8, matmat_from=4)  # tiles
    backends = (
        VulkanBackend(),
        VulkanBackend(tuning=gpu_split),
        VulkanBackend(tuning=gpu_tiles),
        VulkanBackend(subgroups=False, tuning=gpu_split),
    )
    for be in backends:
        for act in ("f32", "q80"):
            runner = Runner(model, be, act, max_seq_len=32, max_batch=4)
            runner.forward(TOKENS, 0, "all")  # prefill batches of 4, 4 and 1 tokens
            runner.forward([1], len(TOKENS))  # decode steps
            runner.forward([2], len(TOKENS) + 1)
            # a cluster node's way: one submission per segment (the network steps between them left out)
            run_graph(runner.program, runner.graph.segments, 3, "all", lambda step, rows: None)
            print(f"ran {be.description} {act}", flush=True)
    for be in backends[:2]:  # --parallel 2: rows of two KV slots in one batch
        runner = Runner(model, be, "f32", max_seq_len=32, max_batch=4, n_slots=2)
        runner.forward(TOKENS[:3], 0, "none", slot=1)
        runner.forward_rows([TOKENS[3], 1, 2], [3, 0, 1], [1, 0, 0])
        runner.forward_rows([TOKENS[4], 3], [4, 2], [1, 0])
        print(f"slots ran on {be.description}", flush=True)
    conflicts(model.config, be)
    print("=== CONTROL ===", flush=True)
    kp = be.kp
    mgr = be.manager
    a, b, c = (mgr.tensor_t(np.ones(64, np.float32), kp.TensorTypes.host) for _ in range(3))
    seq = mgr.sequence()
    seq.record(kp.OpTensorCopy([a, c])).record(kp.OpTensorCopy([b, c])).eval()  # two unordered writes
    print("=== END ===", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
