"""Run a few graph ops on the Vulkan backend with any buffer readable and writable from the test.

A real VulkanProgram is compiled for a hand-made graph (one segment), so buffers, weight packing, bindings
and grids are the backend's own; device-only buffers are read and written through the copy_words shader.
"""

from __future__ import annotations

import numpy as np
from blocks import decode, q80_blocks

from engine.config import ModelConfig
from engine.graph import BufferSpec, Graph, Op, Segment
from engine.slicing import node_slice
from engine.weights import Weight
from shaders.backend import VulkanBackend, VulkanProgram


def config(**kw) -> ModelConfig:
    base = dict(
        arch="llama",
        dim=64,
        hidden_dim=96,
        n_layers=1,
        n_heads=4,
        n_kv_heads=2,
        head_dim=16,
        vocab_size=300,
        context_len=4096,
    )
    base.update(kw)
    return ModelConfig(**base)


class Ops:
    """A compiled one-segment program: set inputs, run n tokens, read outputs."""

    def __init__(
        self,
        be: VulkanBackend,
        ops: list[Op],
        buffers: dict[str, BufferSpec],
        weights: dict[str, Weight] | None = None,
        *,
        cfg: ModelConfig | None = None,
        n_nodes: int = 1,
        act: str = "f32",
        max_batch: int = 8,
        max_seq: int = 64,
        kv_type: str = "f32",
        n_slots: int = 1,
    ):
        cfg = cfg or config()
        bufs = {
            "tok": BufferSpec(1, "i32"),
            "pos": BufferSpec(1, "i32"),
            "zq": BufferSpec(cfg.dim * n_nodes, act),
        }
        if n_slots > 1:
            bufs["slot"] = BufferSpec(1, "i32")
        bufs.update(buffers)
        self.graph = Graph(
            cfg,
            node_slice(cfg, 0, n_nodes),
            act,
            max_seq,
            bufs,
            [Segment(list(ops))],
            kv_type=kv_type,
            n_slots=n_slots,
        )
        self.be, self.max_batch = be, max_batch
        self.prog = VulkanProgram(be, self.graph, dict(weights or {}), max_batch)

    def _copy(self, src, dst, words: int) -> None:
        kp = self.be.kp
        algo = self.be.manager.algorithm(
            [src, dst],
            self.be.shader("copy_words"),
            (-(-words // 256), 1, 1),
            np.array([256], np.uint32),
            np.zeros(3, np.uint32),
        )
        seq = self.be.manager.sequence()
        seq.record(kp.OpAlgoDispatch(algo, np.array([words, 0, 0], np.uint32))).eval()

    def _words(self, name: str) -> int:
        spec = self.graph.buffers[name]
        return -(-self.max_batch * spec.row_bytes // 4)

    def write(self, name: str, a: np.ndarray) -> None:
        """Fill buffer `name` (max_batch rows, or fewer: the rest is left as it is) from a typed array."""
        host = self.read(name)
        host[: a.shape[0]] = a
        words = np.zeros(self._words(name), np.uint32)
        words.view(np.uint8)[: host.nbytes] = host.reshape(-1).view(np.uint8)
        if name in self.prog.views:
            self.prog.views[name][:] = host
        else:
            t = self.be.manager.tensor_t(words, self.be.kp.TensorTypes.host)
            self._copy(t, self.prog.bufs[name], words.size)

    def write_activations(self, name: str, x: np.ndarray, act: str) -> np.ndarray:
        """Write float32 rows x into `name` as `act` (Q80 blocks or f32); return the values the shader sees,
        as float64 (the decoded blocks for Q80)."""
        if act == "q80":
            xq = q80_blocks(x)
            self.write(name, xq)
            return decode(xq, "q80")
        self.write(name, x)
        return x.astype(np.float64)

    def read(self, name: str) -> np.ndarray:
        """A copy of buffer `name`: (max_batch, width) float32/int32; (max_batch, row_bytes) uint8 for Q80."""
        spec = self.graph.buffers[name]
        if name in self.prog.views:
            return self.prog.views[name].copy()
        return self.read_tensor(self.prog.bufs[name], self._words(name), spec)

    def read_tensor(self, tensor, words: int, spec: BufferSpec | None = None) -> np.ndarray:
        t = self.be.manager.tensor_t(np.zeros(words, np.uint32), self.be.kp.TensorTypes.host)
        self._copy(tensor, t, words)
        raw = t.data().copy()
        if spec is None:
            return raw.view(np.float32)
        if spec.dtype == "q80":
            return raw.view(np.uint8)[: self.max_batch * spec.row_bytes].reshape(
                self.max_batch, spec.row_bytes
            )
        dtype = np.int32 if spec.dtype == "i32" else np.float32
        return raw.view(dtype)[: self.max_batch * spec.width].reshape(self.max_batch, spec.width)

    def _cache_layers(self, which: str, layer: int) -> tuple[object, int, np.ndarray]:
        """A layer's cache tensor, its index there and the tensor's contents: (layers, n_slots * max_seq,
        kv_width) float32, or uint16 half bits (f16)."""
        layers = self.prog.k_cache if which == "k" else self.prog.v_cache
        tensor, index = layers.at(layer)
        rows, kvw = self.graph.n_slots * self.graph.max_seq_len, self.prog.kv_width
        f16 = self.graph.kv_type == "f16"
        full = self.read_tensor(tensor, layers.per_chunk * rows * kvw // (2 if f16 else 1))
        return tensor, index, (full.view(np.uint16) if f16 else full).reshape(layers.per_chunk, rows, kvw)

    def cache(self, which: str, layer: int, slot: int = 0) -> np.ndarray:
        """Key or value cache rows of `layer` in KV `slot`: (max_seq, kv_width) float32, or uint16 half bits
        (f16)."""
        _, index, full = self._cache_layers(which, layer)
        seq = self.graph.max_seq_len
        return full[index, slot * seq : (slot + 1) * seq]

    def write_cache(self, which: str, layer: int, rows: np.ndarray, slot: int = 0) -> None:
        """Overwrite the first len(rows) rows of a layer's key or value cache in KV `slot` (uint16 half bits
        for an f16 cache)."""
        tensor, index, full = self._cache_layers(which, layer)
        r0 = slot * self.graph.max_seq_len
        full[index, r0 : r0 + len(rows)] = rows
        words = full.reshape(-1).view(np.uint32).copy()
        t = self.be.manager.tensor_t(words, self.be.kp.TensorTypes.host)
        self._copy(t, tensor, words.size)

    def run(self, n: int) -> None:
        self.prog.run_segment(0, n)
