"""Vulkan backend: every graph op is a GLSL compute shader dispatched through Kompute (kp).

Weights are uploaded once into device-only buffers (same-role weights of many layers share a buffer, so one
pipeline serves every layer with the layer index as a push constant). The ops of a segment are recorded into
one kp sequence per (segments, token count) and replayed; the token count is a push constant. Pipes are
device-local: tok and pos have host staging copies copied in at the start of a run that reads them, logits'
live rows are copied out to host-cached staging at its end, and x and zq are device-only on one node
(host-visible in a cluster, where the network fills them between segments). The patched kp build
(tools/kp-0.9.0-dllama.patch) records a global shader/transfer-write -> compute barrier before a dispatch on
request: `_record` asks for one only where the dispatch reads or writes a buffer written since the last
barrier, or writes one read since then, by read/write sets taken from each shader's SPIR-V (`binding_access`);
submits are ordered by the fence wait after each. `SubmitCounts` says what a recorded run does.
Every op kind is one entry of `OPS` (its shader variant and its dispatches); `OP_KINDS` names them. Runs of
adjacent ops in `FUSIONS` are one dispatch of a shader with the ops' own arithmetic (bit-identical results).
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from engine.backend import Backend, Program
from engine.config import ModelConfig
from engine.errors import DllamaError
from engine.files import release_file_pages
from engine.graph import Graph, Op, ropes_then_store
from engine.slicing import KV_TYPES
from engine.weight_types import weight_type
from engine.weights import BLOCK, Weight, vector_f32
from shaders.compile import spirv
from shaders.devices import DeviceInfo, check_device, list_devices, pick_device
from shaders.weights import (
    Part,
    Piece,
    WeightChunk,
    array_part,
    group_weights,
    row_arrays,
)

PIPES = ("tok", "pos", "slot", "x", "zq", "logits")
# Pipes the host touches. Written by it: device-local, copied in at the start of a run that reads them. Read
# by it: device-local, copied out to host-cached memory at the end of a run that writes them. Exchanged by the
# network between segments: host-visible in a cluster, device-only on one node.
STAGED_IN, STAGED_OUT, EXCHANGED = ("tok", "pos", "slot"), ("logits",), ("x", "zq")
STAGING_WORDS = 1 << 20  # 4 MiB upload chunks: bounds the host memory an upload adds
BUFFER_LIMIT = 1 << 30  # bytes per multi-layer buffer (kept well inside 32-bit word indexing)
MAX_GROUPS_X = 65535
ELEMENTWISE_WG = 128
# matmul.glsl's mat-mat tiles: TR rows x MT batch rows per workgroup of 64 lanes, used from batch 8 on
MATMAT_FROM, MATMAT_WG, MATMAT_ROWS, MATMAT_BATCH = 8, 64, 16, 16
# SPIR-V words binding_access reads: magic, opcodes, decorations, storage classes
SPIRV_MAGIC = 0x07230203
SPV_TYPE_STRUCT, SPV_TYPE_POINTER, SPV_VARIABLE, SPV_DECORATE, SPV_MEMBER_DECORATE = 30, 32, 59, 71, 72
SPV_NON_WRITABLE, SPV_NON_READABLE, SPV_BINDING = 24, 25, 33
SPV_UNIFORM, SPV_STORAGE_BUFFER = 2, 12


def import_kompute():
    """The kp module, refusing a build without dllama's patch: without it dispatches race on real GPUs; the
    backend places barriers itself (`OpAlgoDispatch(..., barrier=)`) and copies only live rows (`bytes=`)."""
    try:
        import kp
    except ImportError as e:
        raise DllamaError(f"Kompute (kp) cannot be loaded ({e}): run tools/setup.sh") from None
    version = importlib.metadata.version("kp")
    if "+dllama" not in version:
        raise DllamaError(f"kp {version} lacks dllama's synchronisation patch: run tools/setup.sh to rebuild")
    if "barrier" not in (kp.OpAlgoDispatch.__init__.__doc__ or "") or "bytes" not in (
        kp.OpTensorSyncLocal.__init__.__doc__ or ""
    ):
        raise DllamaError(f"kp {version} predates dllama's barrier placement: run tools/setup.sh to rebuild")
    if not hasattr(kp.Manager, "enabled_features"):
        raise DllamaError(f"kp {version} predates dllama's device features: run tools/setup.sh to rebuild")
    return kp


def binding_access(code: bytes) -> dict[int, tuple[bool, bool]]:
    """(read, written) for each storage-buffer binding of a SPIR-V module, from its decorations: a buffer
    declared readonly (NonWritable) is not written, writeonly (NonReadable) not read; others count as both."""
    words = np.frombuffer(code, np.uint32)
    if words.size < 5 or int(words[0]) != SPIRV_MAGIC:
        raise DllamaError("not a SPIR-V module")
    bindings: dict[int, int] = {}
    decorated: dict[int, set[int]] = {}  # id -> decorations of the id itself
    members: dict[int, dict[int, set[int]]] = {}  # struct -> member -> decorations
    member_count: dict[int, int] = {}
    pointee: dict[int, int] = {}
    buffers: list[tuple[int, int]] = []  # (pointer type, variable)
    i = 5
    while i < words.size:
        op, n = int(words[i]) & 0xFFFF, int(words[i]) >> 16
        a = [int(w) for w in words[i + 1 : i + n]]
        if n == 0 or i + n > words.size:
            raise DllamaError("a truncated SPIR-V module")
        if op == SPV_DECORATE and a[1] == SPV_BINDING:
            bindings[a[0]] = a[2]
        elif op == SPV_DECORATE:
            decorated.setdefault(a[0], set()).add(a[1])
        elif op == SPV_MEMBER_DECORATE:
            members.setdefault(a[0], {}).setdefault(a[1], set()).add(a[2])
        elif op == SPV_TYPE_STRUCT:
            member_count[a[0]] = len(a) - 1
        elif op == SPV_TYPE_POINTER:
            pointee[a[0]] = a[2]
        elif op == SPV_VARIABLE and a[2] in (SPV_STORAGE_BUFFER, SPV_UNIFORM):
            buffers.append((a[0], a[1]))
        i += n

    def has(var: int, struct: int, decoration: int) -> bool:
        per_member = members.get(struct, {})
        every_member = member_count.get(struct, 0) > 0 and all(
            decoration in per_member.get(m, ()) for m in range(member_count[struct])
        )
        return decoration in decorated.get(var, ()) or every_member

    access = {}
    for ptr, var in buffers:
        if var in bindings:
            struct = pointee.get(ptr, -1)
            access[bindings[var]] = (
                not has(var, struct, SPV_NON_READABLE),
                not has(var, struct, SPV_NON_WRITABLE),
            )
    return access


def rope_table(cfg: ModelConfig, freq_factors: np.ndarray | None, max_seq: int) -> np.ndarray:
    """(max_seq, head_dim/2, 2) float32 (cos, sin) of pos * freq_j, with Llama 3.1 scaling and rope_freqs.

    The angle is a float32 product, as in distributed-llama's cache and the CPU backend.
    """
    half = cfg.head_dim // 2
    freq = cfg.rope_theta ** (-2.0 * np.arange(half, dtype=np.float64) / cfg.head_dim)
    s = cfg.rope_scaling
    if s is not None and s.factor != 1:
        wavelen = 2 * np.pi / freq
        mix = (s.orig_max_seq_len / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
        mid = (1 - mix) * freq / s.factor + mix * freq
        freq = np.where(
            wavelen < s.orig_max_seq_len / s.high_freq_factor,
            freq,
            np.where(wavelen > s.orig_max_seq_len / s.low_freq_factor, freq / s.factor, mid),
        )
    if freq_factors is not None:
        freq = freq / freq_factors.astype(np.float64)
    angle = np.arange(max_seq, dtype=np.float32)[:, None] * freq.astype(np.float32)[None, :]
    angle = angle.astype(np.float64)
    return np.stack([np.cos(angle), np.sin(angle)], axis=-1).astype(np.float32)


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _grid(groups: int) -> tuple[int, int, int]:
    """A workgroup count folded into (x, y) so that x stays within the guaranteed 65535."""
    groups = max(groups, 1)
    gx = min(groups, MAX_GROUPS_X)
    return gx, _ceil(groups, gx), 1


def _pow2_floor(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


@dataclass(frozen=True)
class Tuning:
    """How the shaders split their work. Matmul (see matmul.glsl): `split` (a workgroup shares a row group,
    for GPUs) or not (each invocation owns one, for CPU implementations), `rows` per group, `batch` rows of
    the batch per pass; with `split`, `matvec_wg` lanes per mat-vec workgroup (one subgroup where the device
    has subgroup arithmetic) and the mat-mat tiles from `matmat_from` batch rows on (0: never).
    `reduce_wg`: workgroup size of the row-reducing shaders (rmsnorm, attention). Attention (attention.comp)
    splits a row's positions into chunks of at least `attn_chunk` positions and at most `attn_chunks` of
    them; `split` also stages the key rows through shared memory (coalesced reads). `int_dot`: the mat-vec
    paths of 32-value block weights times Q80 activations use packed 4x8 integer dot products (INT_DOT)
    where the device was created with them; False keeps the float form."""

    split: bool
    rows: int
    batch: int
    reduce_wg: int
    matvec_wg: int = 64
    matmat_from: int = 0
    attn_chunk: int = 64
    attn_chunks: int = 64
    int_dot: bool = True

    @staticmethod
    def for_device(dev: DeviceInfo) -> Tuning:
        """Wide workgroups on GPUs; on CPU implementations, where idle lanes, barriers and every buffer load
        are expensive, invocations that each own whole rows; integer dot products where the device has them
        (on lavapipe as fast as the float form or faster)."""
        if dev.is_cpu:
            return Tuning(
                split=False,
                rows=4,
                batch=2,
                reduce_wg=16,
                attn_chunk=256,
                attn_chunks=4,
                int_dot=dev.integer_dot,
            )
        sub = dev.subgroup_size if dev.subgroup_arithmetic and 16 <= dev.subgroup_size <= 64 else 64
        return Tuning(
            split=True,
            rows=2,
            batch=2,
            reduce_wg=min(256, _pow2_floor(dev.max_workgroup_invocations)),
            matvec_wg=sub,
            matmat_from=MATMAT_FROM,
            int_dot=dev.integer_dot,
        )


class VulkanBackend(Backend):
    """One Vulkan device through Kompute. `subgroups` forces (True) or forbids (False) subgroup reductions and
    `tuning` overrides the device's default work split (tests run the GPU split on lavapipe with it)."""

    name = "vulkan"

    def __init__(
        self, gpu_index: int | None = None, subgroups: bool | None = None, tuning: Tuning | None = None
    ):
        self.device: DeviceInfo = pick_device(list_devices(), gpu_index)
        check_device(self.device, 0)
        if subgroups and not self.device.subgroup_arithmetic:
            raise DllamaError(
                f"{self.device.name} lacks subgroup arithmetic in compute shaders, "
                "which the subgroup variant of the shaders requires"
            )
        self.subgroups = self.device.subgroup_arithmetic if subgroups is None else subgroups
        self.kp = import_kompute()
        try:
            self.manager = self.kp.Manager(self.device.index)
        except RuntimeError as e:
            raise DllamaError(
                f"cannot open Vulkan device {self.device.index} ({self.device.name}): {e}"
            ) from None
        self.max_wg = min(256, _pow2_floor(self.device.max_workgroup_invocations))
        self.tuning = tuning or Tuning.for_device(self.device)
        self.share_x = (
            not self.tuning.split
            and self.subgroups
            and self.device.subgroup_ballot
            and self.device.subgroup_size >= 8
        )
        self.buffer_limit = min(BUFFER_LIMIT, self.device.max_storage_buffer_range)
        # kp enables VK_KHR_shader_integer_dot_product's feature where the device has it, and says so
        self.int_dot = self.tuning.int_dot and "shaderIntegerDotProduct" in self.manager.enabled_features
        reduce = f"subgroups of {self.device.subgroup_size}" if self.subgroups else "shared-memory reductions"
        kind = "CPU emulation" if self.device.is_cpu else self.device.kind
        dots = "; integer dot products" if self.int_dot else ""
        self.description = f"Vulkan {self.device.name} ({kind}; {reduce}{dots})"

    def shader(self, name: str, flags: tuple[str, ...] = ()) -> bytes:
        """SPIR-V of a shader in this backend's variant (subgroups or not) with an op's macro flags
        (ACT_Q80: Q80 matmul activations; INT_DOT: their packed integer dot products; MOE: expert stacks)."""
        defines: dict[str, int | str] = dict.fromkeys(flags, 1)
        if self.subgroups:
            defines["USE_SUBGROUPS"] = 1
        if self.share_x and name.startswith("matmul_"):
            defines["SHARE_X"] = 1
        return spirv(name, defines)

    def compile(self, graph: Graph, weights: dict[str, Weight], max_batch: int) -> Program:
        return VulkanProgram(self, graph, weights, max_batch)


def _push(n: int = 0, aux: int = 0, rows: int = 0) -> np.ndarray:
    """The push constants every shader declares (common.glsl): tokens, layer or offset, matrix rows."""
    return np.array([n, aux, rows], np.uint32)


@dataclass(frozen=True)
class _Step:
    """One recorded dispatch: the algorithm and its per-dispatch push constants."""

    algo: object  # kp.Algorithm
    aux: int = 0
    rows: int = 0


@dataclass
class SubmitCounts:
    """What one replay of a recorded sequence does (one submit), counted when it is recorded: dispatches,
    the global barriers before them, staging copies and their bytes, and the bytes shaders read from
    host-visible buffers (n_tokens rows of each host-visible pipe a dispatch reads)."""

    dispatches: int = 0
    barriers: int = 0
    transfers: int = 0
    transfer_bytes: int = 0
    host_read_bytes: int = 0


@dataclass(frozen=True)
class _Layers:
    """Per-layer buffers (KV caches) stored as chunks of consecutive layers."""

    tensors: list
    per_chunk: int

    def at(self, layer: int) -> tuple[object, int]:
        return self.tensors[layer // self.per_chunk], layer % self.per_chunk


class VulkanProgram(Program):
    """Device buffers, uploaded weights, one kp algorithm per distinct dispatch, the recorded sequences.

    Attributes tests may use: `bufs` (graph buffer -> kp tensor), `k_cache`/`v_cache` (_Layers),
    `device_bytes` (what the device buffers take), `submits` (sequences evaluated so far), `recorded`
    ((start, stop, tokens) -> SubmitCounts).
    """

    def __init__(self, be: VulkanBackend, graph: Graph, weights: dict[str, Weight], max_batch: int):
        self.be, self.graph, self.max_batch = be, graph, max_batch
        self.kp, self.mgr = be.kp, be.manager
        cfg, sl = graph.config, graph.slice
        if cfg.head_dim > 256 or cfg.head_dim % 2:
            raise DllamaError(
                f"the Vulkan attention shader needs an even head_dim <= 256 (got {cfg.head_dim})"
            )
        self.weights = {op.weight: weights[op.weight] for op in graph.ops() if op.weight}
        self.chunks, self.slots = group_weights(self.weights, be.buffer_limit)
        self.host_pipes = frozenset(n for n in EXCHANGED if n in graph.buffers and sl.n_nodes > 1)
        # one node, f32 partial sums: to_pipe adds into x itself and merge_add has nothing left to do
        zq = graph.buffers.get("zq")
        self.fused_residual = (
            sl.n_nodes == 1
            and zq is not None
            and zq.dtype == "f32"
            and "x" in graph.buffers
            and any(op.kind == "to_pipe" for op in graph.ops())
        )
        self.kv_width = sl.n_kv_heads * cfg.head_dim
        self.kv_rows = graph.n_slots * graph.max_seq_len  # per layer: slot s owns rows s*max_seq_len..
        layer_bytes = self.kv_rows * self.kv_width * KV_TYPES[graph.kv_type]
        self.layers_per_kv = max(1, min(cfg.n_layers, be.buffer_limit // max(layer_bytes, 1)))
        self.att_chunk = attention_chunk(be.tuning, graph.max_seq_len)
        self._check_memory(max_batch)
        self.runs = self._fuse()
        self._precompile()

        self.bufs: dict[str, object] = {}
        self.views: dict[str, np.ndarray] = {}
        for name, spec in graph.buffers.items():
            self._alloc_buffer(name, spec.dtype, spec.width, spec.row_bytes)
        kv_chunks = range(_ceil(cfg.n_layers, self.layers_per_kv))
        kv_words = self.layers_per_kv * self.kv_rows * self.kv_width * KV_TYPES[graph.kv_type] // 4
        self.k_cache = _Layers([self._storage(kv_words, "key cache") for _ in kv_chunks], self.layers_per_kv)
        self.v_cache = _Layers(
            [self._storage(kv_words, "value cache") for _ in kv_chunks], self.layers_per_kv
        )
        self.kv_cache_bytes = 2 * len(kv_chunks) * kv_words * 4
        self.att_partials = self._storage(self._partial_words(max_batch), "attention partials")

        factors = weights.get("rope_freqs.weight")
        table = array_part(
            rope_table(cfg, None if factors is None else vector_f32(factors), graph.max_seq_len)
        )
        largest = max([table.words] + [p.words for c in self.chunks for p in c.parts(c.weights[0])])
        up = _Uploader(self, min(largest, STAGING_WORDS))
        self.rope = self._storage(table.words, "RoPE table")
        up.upload(table, self.rope, 0)
        self.chunk_tensors = [self._upload_chunk(up, c) for c in self.chunks]
        up.close()
        for chunk in self.chunks:  # again: the kernel's fault-around maps neighbours of later reads back in
            for w in chunk.weights:
                for a in row_arrays(w):
                    release_file_pages(a)
        emb = self.weights.get("token_embd.weight")
        self.vocab = emb.rows if emb is not None else 0

        self._algos: dict[tuple, object] = {}
        self._access: dict[int, tuple[list, list]] = {}  # id(algorithm) -> (tensors read, tensors written)
        self._host_rows = {id(self.bufs[n]): graph.buffers[n].row_bytes for n in self.host_pipes}
        self.pipe_writes = [
            sorted({o for op in seg.ops for o in op.outputs if o in PIPES}) for seg in graph.segments
        ]
        self.sequences: dict[tuple[int, int, int], object] = {}  # (start, stop, tokens) -> kp.Sequence
        self.recorded: dict[tuple[int, int, int], SubmitCounts] = {}
        self.submits = 0

    # ---- memory ----
    def _check_memory(self, max_batch: int) -> None:
        """Refuse what cannot fit, before allocating: a buffer beyond the binding range, too little device
        memory (device buffers; host-visible pipes live in host memory on a discrete GPU)."""
        g, dev = self.graph, self.be.device
        kv = self.layers_per_kv * self.kv_rows * self.kv_width * KV_TYPES[g.kv_type]
        pipes = [max_batch * spec.row_bytes for name, spec in g.buffers.items() if name in self.host_pipes]
        sizes = [
            max_batch * spec.row_bytes for name, spec in g.buffers.items() if name not in self.host_pipes
        ]
        sizes += [kv] * (2 * _ceil(g.config.n_layers, self.layers_per_kv))
        sizes += [
            self._partial_words(max_batch) * 4,
            g.max_seq_len * g.config.head_dim * 4,
        ]
        sizes += [4 * w for c in self.chunks for w in c.part_words]
        total = self.device_bytes = sum(sizes)
        if total > dev.device_local_bytes:
            lower = "--parallel or --max-seq-len" if g.n_slots > 1 else "--max-seq-len"
            raise DllamaError(
                f"the model needs {total / 2**20:.0f} MiB of device memory but {dev.name} has "
                f"{dev.device_local_bytes / 2**20:.0f} MiB: lower {lower}, use more nodes or the CPU"
            )
        check_device(dev, max(sizes + pipes))

    def _partial_words(self, max_batch: int) -> int:
        """Floats of attention.comp's chunk records: head_dim + 2 per (row, query head, chunk)."""
        g = self.graph
        return (
            max_batch
            * max(g.slice.n_heads, 1)
            * _ceil(g.max_seq_len, self.att_chunk)
            * (g.config.head_dim + 2)
        )

    def _tensor(self, init: np.ndarray, host: bool, what: str, staged: bool = False):
        """A host-visible buffer (`host`), a device-local one with a host staging copy (`staged`: kp's device
        tensors) or a device-only one."""
        types = self.kp.TensorTypes
        kind = types.device if staged else types.host if host else types.storage
        try:
            return self.mgr.tensor_t(init, kind)
        except RuntimeError as e:
            raise DllamaError(
                f"Vulkan could not allocate the {what} ({init.nbytes / 2**20:.1f} MiB) on "
                f"{self.be.device.name}: {e}"
            ) from None

    def _storage(self, words: int, what: str):
        """A device-only buffer; its host-side initialiser is never touched (kp ignores it for storage)."""
        return self._tensor(np.zeros(max(words, 1), np.uint32), False, what)

    def _alloc_buffer(self, name: str, dtype: str, width: int, row_bytes: int) -> None:
        """Device-only buffers, except pipes the host touches: tok, pos and logits through staging copies,
        x and zq host-visible in a cluster."""
        words = _ceil(self.max_batch * row_bytes, 4)
        staged = name in STAGED_IN + STAGED_OUT
        if not staged and name not in self.host_pipes:
            self.bufs[name] = self._storage(words, f"{name} buffer")
            return
        np_type = {"f32": np.float32, "i32": np.int32, "q80": np.uint32}[dtype]
        t = self._tensor(np.zeros(words, np_type), True, f"{name} pipe", staged)
        self.bufs[name] = t
        data = t.data()
        if dtype == "q80":
            data = data.view(np.uint8)[: self.max_batch * row_bytes]
            self.views[name] = data.reshape(self.max_batch, row_bytes)
        else:
            self.views[name] = data.reshape(self.max_batch, width)

    def _upload_chunk(self, up: _Uploader, chunk: WeightChunk) -> list:
        w0 = chunk.weights[0]
        tensors = [self._storage(words, f"{w0.name} buffer") for words in chunk.part_words]
        for k, w in enumerate(chunk.weights):
            for part, t in zip(chunk.parts(w), tensors, strict=True):
                up.upload(part, t, k * part.words)
            for a in row_arrays(w):
                release_file_pages(a)
        return tensors

    # ---- fused runs of ops (FUSIONS) ----
    def _fuse(self) -> list[list[_Run]]:
        """Each segment's ops as runs: a run of FUSIONS where its conditions hold (one dispatch) or one op."""
        flat = list(self.graph.ops())
        runs, at = [], 0
        for seg in self.graph.segments:
            ops, i, seg_runs = seg.ops, 0, []
            while i < len(ops):
                run = next(filter(None, (f.match(self, ops, i, flat, at + i) for f in FUSIONS)), None)
                run = run or _Run((ops[i],))
                seg_runs.append(run)
                i += len(run.ops)
            runs.append(seg_runs)
            at += len(ops)
        return runs

    def read_later(self, flat: list[Op], stop: int, buffer: str) -> bool:
        """Whether an op after flat[:stop] reads `buffer` before one overwrites it, the graph replayed from
        its start again after its end (pipes always: the host or the network reads them)."""
        if buffer in PIPES:
            return True
        for op in flat[stop:] + flat[:stop]:
            if buffer in op.inputs:
                return True
            if buffer in op.outputs:
                return False
        return False

    # ---- shaders ----
    def _precompile(self) -> None:
        """Compile (or load from the cache) every shader variant the graph uses, in parallel."""
        keys = {run.fusion.shader(self, run) for seg in self.runs for run in seg if run.fusion}
        keys |= {self._shader_key(run.ops[0]) for seg in self.runs for run in seg if not run.fusion}
        keys.add(("copy_words", ()))
        if any(op.kind == "attention" for op in self.graph.ops()):
            keys.add(ATTENTION_COMBINE)
        with ThreadPoolExecutor(max_workers=4) as pool:
            list(pool.map(lambda k: self.be.shader(*k), sorted(keys)))

    def _shader_key(self, op: Op) -> ShaderKey:
        return _impl(op).shader(self, op)

    def shader_variant(self, op_name: str) -> ShaderKey:
        """The shader and macro flags the graph op named `op_name` runs with (e.g. a matmul's INT_DOT; the
        fusion's shader for an op of a fused run)."""
        for run in (run for seg in self.runs for run in seg):
            if any(op.name == op_name for op in run.ops):
                return run.fusion.shader(self, run) if run.fusion else self._shader_key(run.ops[0])
        raise DllamaError(f"the graph has no op named {op_name!r}")

    def _algo(
        self, op: Op, tensors: list, groups: int, wg: int, spec: list[int], shader: ShaderKey | None = None
    ):
        """The kp algorithm for a shader (the op's, unless given), buffers and constants; identical ones
        (other layers) are shared."""
        name, flags = shader or self._shader_key(op)
        key = (name, flags, tuple(id(t) for t in tensors), groups, wg, tuple(spec))
        if key not in self._algos:
            spirv_code = self.be.shader(name, flags)
            spec_consts = np.array([wg, *spec], np.uint32)
            algo = self._algos[key] = self.mgr.algorithm(
                tensors, spirv_code, _grid(groups), spec_consts, _push()
            )
            access = binding_access(spirv_code)
            safe = (True, True)  # a binding the module does not declare: assume both
            reads = [t for b, t in enumerate(tensors) if access.get(b, safe)[0]]
            writes = [t for b, t in enumerate(tensors) if access.get(b, safe)[1]]
            self._access[id(algo)] = reads, writes
        return self._algos[key]

    def _weight(self, name: str) -> list[tuple[list, Piece]]:
        """The device buffers and the piece of each row range of a weight (one range unless it is huge)."""
        return [(self.chunk_tensors[p.chunk], p) for p in self.slots[name]]

    def _bind(self, op: Op, rows: int) -> list[_Step]:
        """One op as its dispatches (one per piece of a huge weight), with grids for up to `rows` tokens.

        Decode gets grids sized for one token: surplus workgroups exit at once, but on CPU implementations
        even an empty workgroup costs microseconds.
        """
        return _impl(op).bind(self, op, rows)

    def _bind_run(self, run: _Run, rows: int) -> list[_Step]:
        """A fused run's one dispatch, or its single op's dispatches."""
        return run.fusion.bind(self, run, rows) if run.fusion else self._bind(run.ops[0], rows)

    def width(self, buffer: str) -> int:
        return self.graph.buffers[buffer].width

    def is_q80(self, buffer: str) -> bool:
        return self.graph.buffers[buffer].dtype == "q80"

    # ---- running ----
    def pipe(self, name: str) -> np.ndarray:
        if name in EXCHANGED and name not in self.views:
            raise DllamaError(f"the {name} pipe is device-only on one node: the host cannot read or write it")
        return self.views[name]

    def copy_row(self, names: tuple[str, ...], src: int, dst: int) -> None:
        """Device-only pipes are copied on the device (one submit for all), host-visible ones by the host."""
        on_host = tuple(n for n in names if n in self.views)
        super().copy_row(on_host, src, dst)
        moved = [n for n in names if n not in self.views]
        if not moved:
            return
        seq = self.mgr.sequence()  # a fresh one: the row offsets are push constants
        for name in moved:
            words = self.graph.buffers[name].row_bytes // 4
            key = ("move_words", id(self.bufs[name]), words)
            if key not in self._algos:
                code, wg = self.be.shader("move_words"), np.array([ELEMENTWISE_WG], np.uint32)
                grid = _grid(_ceil(words, ELEMENTWISE_WG))
                self._algos[key] = self.mgr.algorithm([self.bufs[name]], code, grid, wg, _push())
            seq.record(self.kp.OpAlgoDispatch(self._algos[key], _push(words, src * words, dst * words)))
        self.submits += 1
        seq.eval()
        seq.destroy()

    def run_segment(self, index: int, n_tokens: int) -> None:
        self.run_segments(index, index + 1, n_tokens)

    def run_segments(self, start: int, stop: int, n_tokens: int) -> None:
        """One recorded sequence per (segments, token count), replayed: one submit and fence wait."""
        segments = self.graph.segments[start:stop]
        if not any(seg.ops for seg in segments):
            return
        if not 1 <= n_tokens <= self.max_batch:
            raise DllamaError(f"{n_tokens} tokens do not fit a batch of {self.max_batch}")
        if any(op.kind == "embedding" for seg in segments for op in seg.ops):
            tok = self.views["tok"][:n_tokens, 0]
            bad = tok[(tok < 0) | (tok >= self.vocab)]
            if bad.size:
                raise DllamaError(f"token id {int(bad[0])} is outside the vocabulary (0..{self.vocab - 1})")
        seq = self.sequences.get((start, stop, n_tokens))
        if seq is None:
            seq = self.sequences[(start, stop, n_tokens)] = self._record(start, stop, n_tokens)
        self.submits += 1
        seq.eval()

    def counts(self, start: int, stop: int, n_tokens: int) -> SubmitCounts:
        """What one run of segments start..stop-1 on n_tokens rows does (recording it if not yet recorded)."""
        key = (start, stop, n_tokens)
        if key not in self.sequences:
            self.sequences[key] = self._record(start, stop, n_tokens)
        return self.recorded[key]

    def _record(self, start: int, stop: int, n_tokens: int):
        """The segments' dispatches for n_tokens rows between the staging copies of the pipes the host writes
        (before) and reads (after), with a barrier only before a dispatch that conflicts with one since the
        last barrier (reads or writes what was written, writes what was read); other submits are ordered by
        the fence wait between them."""
        kp = self.kp
        seq = self.mgr.sequence()
        counts = self.recorded[(start, stop, n_tokens)] = SubmitCounts()
        rows = 1 if n_tokens == 1 else self.max_batch
        steps = [
            step for i in range(start, stop) for run in self.runs[i] for step in self._bind_run(run, rows)
        ]
        accesses = [self._access[id(step.algo)] for step in steps]
        read_any = {id(t) for reads, _ in accesses for t in reads}
        written: set[int] = set()
        read: set[int] = set()
        for name in STAGED_IN:
            t = self.bufs.get(name)
            if t is not None and id(t) in read_any:
                nbytes = n_tokens * self.graph.buffers[name].row_bytes
                seq.record(kp.OpTensorSyncDevice([t], bytes=nbytes))
                counts.transfers, counts.transfer_bytes = counts.transfers + 1, counts.transfer_bytes + nbytes
                written.add(id(t))
        for step, (reads, writes) in zip(steps, accesses, strict=True):
            r, w = {id(t) for t in reads}, {id(t) for t in writes}
            barrier = bool((r | w) & written or w & read)
            if barrier:
                written, read = set(), set()
                counts.barriers += 1
            written |= w
            read |= r
            seq.record(kp.OpAlgoDispatch(step.algo, _push(n_tokens, step.aux, step.rows), barrier=barrier))
            counts.dispatches += 1
            counts.host_read_bytes += sum(n_tokens * self._host_rows.get(t, 0) for t in r)
        out = sorted({name for i in range(start, stop) for name in self.pipe_writes[i]})
        for name in out:
            if name in STAGED_OUT:  # its own shader-write -> copy barrier, then the copy for the host
                nbytes = n_tokens * self.graph.buffers[name].row_bytes
                seq.record(kp.OpTensorSyncLocal([self.bufs[name]], bytes=nbytes))
                counts.transfers, counts.transfer_bytes = counts.transfers + 1, counts.transfer_bytes + nbytes
        host = [self.bufs[name] for name in out if name in self.host_pipes]
        if host:  # a shader-write -> host-read barrier
            seq.record(kp.OpTensorSyncLocal(host))
        return seq


class _Uploader:
    """Fills device-only buffers through one reusable host-visible staging buffer and copy_words."""

    def __init__(self, prog: VulkanProgram, words: int):
        self.prog, self.words = prog, words
        self.staging = None
        self.view: np.ndarray | None = None
        self.algos: dict[tuple[int, int], object] = {}

    def upload(self, part: Part, dst, offset: int) -> None:
        """Write `part` into `dst` from word `offset` on, a staging buffer's worth of rows at a time."""
        prog, kp = self.prog, self.prog.kp
        if part.row_words > self.words:
            raise DllamaError(f"a weight row of {part.row_words * 4} bytes exceeds the upload buffer")
        if self.staging is None:
            self.staging = prog._tensor(np.zeros(self.words, np.uint32), True, "upload staging buffer")
            self.view = self.staging.data()
        groups = _ceil(min(part.words, self.words), 256)
        algo = self.algos.get((id(dst), groups))
        if algo is None:
            code, wg = prog.be.shader("copy_words"), np.array([256], np.uint32)
            algo = self.algos[(id(dst), groups)] = prog.mgr.algorithm(
                [self.staging, dst], code, _grid(groups), wg, _push()
            )
        chunk_rows = self.words // max(part.row_words, 1)
        for r0 in range(0, part.rows, chunk_rows):
            words = part.pack(r0, min(part.rows, r0 + chunk_rows))
            self.view[: words.size] = words
            seq = prog.mgr.sequence()  # a fresh one: kp's command pools cannot reset a recorded buffer
            seq.record(kp.OpAlgoDispatch(algo, _push(words.size, offset + r0 * part.row_words)))
            seq.eval()
            seq.destroy()

    def close(self) -> None:
        for algo in self.algos.values():
            algo.destroy()
        if self.staging is not None:
            self.staging.destroy()
            self.staging = self.view = None


# ---- the op registry: every graph op kind, its shader variant and its dispatch ----
ShaderKey = tuple[str, tuple[str, ...]]  # shader name, macro flags


@dataclass(frozen=True)
class _OpImpl:
    """How the backend runs one op kind: which shader variant, and the dispatch for up to `rows` tokens."""

    shader: Callable[[VulkanProgram, Op], ShaderKey]
    bind: Callable[[VulkanProgram, Op, int], list[_Step]]


def _fixed(name: str) -> Callable[[VulkanProgram, Op], ShaderKey]:
    return lambda prog, op: (name, ())


def _by_pipe(f32: str, q80: str) -> Callable[[VulkanProgram, Op], ShaderKey]:
    """The shader for the zq pipe's number format."""
    return lambda prog, op: (q80 if prog.is_q80("zq") else f32, ())


def _by_kv(name: str) -> Callable[[VulkanProgram, Op], ShaderKey]:
    """The shader for the KV cache's number format."""
    return lambda prog, op: (name, ("KV_F16",) if prog.graph.kv_type == "f16" else ())


def _tensors(prog: VulkanProgram, names: tuple[str, ...]) -> list:
    return [prog.bufs[n] for n in names]


def _vector(prog: VulkanProgram, op: Op, length: int, what: str) -> tuple[list, int]:
    """The uploaded vector weight of an op (its buffers, its index in them): `length` values."""
    w = prog.weights[op.weight]
    if w.cols != length or w.rows != 1 or w.experts:
        raise DllamaError(f"{op.name}: {w.name} has shape {w.shape}, {what} needs a vector of {length}")
    ((parts, piece),) = prog._weight(op.weight)
    return parts, piece.index


def _embedding(prog: VulkanProgram, op: Op, rows: int) -> list[_Step]:
    """One dispatch per piece of the table; each writes the tokens in its rows."""
    w = prog.weights[op.weight]
    groups = _ceil(rows * (w.cols // BLOCK), ELEMENTWISE_WG)
    steps = []
    for parts, piece in prog._weight(op.weight):
        tensors = [*_tensors(prog, op.inputs + op.outputs), *parts]
        algo = prog._algo(op, tensors, groups, ELEMENTWISE_WG, [w.cols, piece.row0])
        steps.append(_Step(algo, piece.index, piece.rows))
    return steps


def _rmsnorm(prog: VulkanProgram, op: Op, rows: int) -> list[_Step]:
    """One workgroup per (token, group of the weight's length)."""
    width, group = prog.width(op.inputs[0]), prog.weights[op.weight].cols
    if width % group:
        raise DllamaError(f"{op.name}: a norm weight of {group} values does not divide rows of {width}")
    parts, i = _vector(prog, op, group, "rmsnorm")
    eps = int(np.float32(op.params["eps"]).view(np.uint32))
    wg = min(prog.be.tuning.reduce_wg, _pow2_floor(group))
    tensors = [*_tensors(prog, op.inputs + op.outputs), *parts]
    return [_Step(prog._algo(op, tensors, rows * (width // group), wg, [width, eps, group]), i)]


def _add_bias(prog: VulkanProgram, op: Op, rows: int) -> list[_Step]:
    width = prog.width(op.inputs[0])
    parts, i = _vector(prog, op, width, "add_bias")
    tensors = [prog.bufs[op.inputs[0]], *parts]
    return [_Step(prog._algo(op, tensors, _ceil(rows * width, ELEMENTWISE_WG), ELEMENTWISE_WG, [width]), i)]


def _matmul_shader(prog: VulkanProgram, op: Op) -> ShaderKey:
    """matmul_<type>; Q80 activations add ACT_Q80, and INT_DOT for 32-value block weights on a device with
    packed integer dot products (their mat-vec paths; the mat-mat tiles stay float)."""
    wt = weight_type(prog.weights[op.weight].dtype)
    name = f"matmul_{wt.name}"
    if not prog.is_q80(op.inputs[0]):
        return name, ()
    return name, ("ACT_Q80", "INT_DOT") if prog.be.int_dot and wt.block_values == BLOCK else ("ACT_Q80",)


def _moe_matmul_shader(prog: VulkanProgram, op: Op) -> ShaderKey:
    name, flags = _matmul_shader(prog, op)
    return name, (*flags, "MOE")


def _matmul_steps(
    prog: VulkanProgram,
    op: Op,
    tensors: list,
    batch: int,
    extra: list[int],
    matmat: bool,
    fused: tuple[list[tuple[list, Piece]], ShaderKey] | None = None,
) -> list[_Step]:
    """One dispatch per piece of the weight (its rows of the output); `tensors` precede the weight's
    buffers, `extra` constants follow COLS, R, SPLIT, TB (`batch`), OUT_ROWS, OUT0, MT; `matmat`: tiles;
    `fused`: a fused run's shader with its buffers for each piece in place of the weight's."""
    w, m = prog.weights[op.weight], prog.be.tuning
    pieces, shader = fused or (prog._weight(op.weight), None)
    if matmat:
        wg, rows, mt = MATMAT_WG, MATMAT_ROWS, MATMAT_BATCH
    else:
        wg, rows, mt = (min(prog.be.max_wg, m.matvec_wg) if m.split else 64), m.rows, 0
    steps = []
    for parts, piece in pieces:
        groups = _ceil(piece.rows, rows) if m.split else _ceil(piece.rows, rows * wg)
        spec = [w.cols, m.rows, int(m.split), batch, w.rows, piece.row0, mt, *extra]
        algo = prog._algo(op, [*tensors, *parts], groups, wg, spec, shader)
        steps.append(_Step(algo, piece.index, piece.rows))
    return steps


def _matmul(
    prog: VulkanProgram, op: Op, rows: int, fused: tuple[list[tuple[list, Piece]], ShaderKey] | None = None
) -> list[_Step]:
    m = prog.be.tuning
    matmat = m.split and 0 < m.matmat_from <= rows
    return _matmul_steps(prog, op, _tensors(prog, op.inputs + op.outputs), m.batch, [], matmat, fused)


def _moe_matmul(prog: VulkanProgram, op: Op, rows: int) -> list[_Step]:
    """Expert-stack matmul over the (token, slot) pairs; x is shared by the slots or has one row per slot."""
    (x, idx), w = op.inputs, prog.weights[op.weight]
    slots = op.params["slots"]
    if not w.experts:
        raise DllamaError(f"{op.name}: moe_matmul needs an expert stack, but {w.name} is one matrix")
    if prog.width(x) not in (w.cols, slots * w.cols):
        raise DllamaError(
            f"{op.name}: input {x} has {prog.width(x)} values per token; {w.name} needs {w.cols} "
            f"(shared by the slots) or {slots * w.cols} (one input per slot)"
        )
    tensors = [prog.bufs[x], prog.bufs[op.outputs[0]], prog.bufs[idx]]
    extra = [slots, w.experts, int(prog.width(x) == slots * w.cols)]
    return _matmul_steps(prog, op, tensors, 1, extra, False)  # TB 1: every pair has its own expert


def _moe_route(prog: VulkanProgram, op: Op, rows: int) -> list[_Step]:
    k, experts = op.params["k"], prog.width(op.inputs[0])
    if not 1 <= k <= experts:
        raise DllamaError(f"{op.name}: cannot route to {k} of {experts} experts")
    spec = [experts, k, int(op.params["normalize"])]
    return [_Step(prog._algo(op, _tensors(prog, op.inputs + op.outputs), _ceil(rows, 64), 64, spec))]


def _moe_sum(prog: VulkanProgram, op: Op, rows: int) -> list[_Step]:
    width, slots = prog.width(op.outputs[0]), prog.width(op.inputs[1])
    groups = _ceil(rows * width, ELEMENTWISE_WG)
    tensors = _tensors(prog, op.inputs + op.outputs)
    return [_Step(prog._algo(op, tensors, groups, ELEMENTWISE_WG, [width, slots]))]


def _quantize_q80(prog: VulkanProgram, op: Op, rows: int) -> list[_Step]:
    nb = prog.width(op.inputs[0]) // BLOCK
    tensors = _tensors(prog, op.inputs + op.outputs)
    return [_Step(prog._algo(op, tensors, _ceil(_ceil(rows * nb, 2), 64), 64, [nb, nb, 0]))]


def _rope(prog: VulkanProgram, op: Op, rows: int) -> list[_Step]:
    width, p = prog.width(op.inputs[0]), op.params
    spec = [width, p["head_dim"], int(p["neox"])]
    tensors = [prog.bufs[op.inputs[0]], prog.bufs["pos"], prog.rope]
    return [_Step(prog._algo(op, tensors, _ceil(rows * width // 2, ELEMENTWISE_WG), ELEMENTWISE_WG, spec))]


def _slot_buffer(prog: VulkanProgram) -> object:
    """The rows' KV slots; with one slot the shaders ignore that binding, which then holds `pos`."""
    return prog.bufs["slot" if prog.graph.n_slots > 1 else "pos"]


def _kv_store(prog: VulkanProgram, op: Op, rows: int) -> list[_Step]:
    (kc, i), (vc, _) = prog.k_cache.at(op.params["layer"]), prog.v_cache.at(op.params["layer"])
    tensors = [prog.bufs["k"], prog.bufs["v"], prog.bufs["pos"], kc, vc, _slot_buffer(prog)]
    per_invocation = KV_TYPES["f32"] // KV_TYPES[prog.graph.kv_type]  # values: 2 halves per f16 word
    groups = _ceil(rows * prog.kv_width // per_invocation, ELEMENTWISE_WG)
    spec = [prog.kv_width, prog.graph.max_seq_len, prog.graph.n_slots]
    return [_Step(prog._algo(op, tensors, groups, ELEMENTWISE_WG, spec), i)]


ATTENTION_COMBINE: ShaderKey = ("attention_combine", ())
ATTENTION_HEADS = 8  # most query heads per attention workgroup (attention.comp's per-lane accumulators)
ATTENTION_QUERIES = 1024  # most floats of those heads' queries in shared memory
ATTENTION_TILE = 2048  # floats of key rows one tiled attention block stages in shared memory


def attention_chunk(tuning: Tuning, max_seq: int) -> int:
    """Positions per attention workgroup: at least the tuning's chunk, few enough chunks to bound the
    partials buffer (head_dim + 2 floats per row, head and chunk)."""
    return max(tuning.attn_chunk, _ceil(max_seq, tuning.attn_chunks))


def _attention(prog: VulkanProgram, op: Op, rows: int) -> list[_Step]:
    """Pass 1 over (row, KV head, block of its query heads, chunk of positions), then the per-head merge."""
    p, m = op.params, prog.be.tuning
    (kc, i), (vc, _) = prog.k_cache.at(p["layer"]), prog.v_cache.at(p["layer"])
    nh, nkv, hd, group, seq = p["n_heads"], p["n_kv_heads"], p["head_dim"], p["group"], prog.graph.max_seq_len
    heads = max(1, min(group, ATTENTION_HEADS, ATTENTION_QUERIES // hd))
    if m.split:
        wg = min(m.reduce_wg, prog.be.max_wg, max(32, 1 << (hd - 1).bit_length()))
        block = min(32, _pow2_floor(ATTENTION_TILE // hd))
    else:
        wg, block = m.reduce_wg, 64
    wg = max(wg, _ceil(hd, 4))  # at most 4 value dimensions per lane
    chunk = prog.att_chunk
    chunks = _ceil(seq, chunk)
    spec = [nh, nkv, hd, seq, group, p["q_offset"], prog.graph.n_slots, chunk, heads, block, int(m.split)]
    tensors = [prog.bufs[op.inputs[0]], prog.bufs["pos"], _slot_buffer(prog), kc, vc, prog.att_partials]
    groups = rows * nkv * _ceil(group, heads) * chunks
    merge = [prog.att_partials, prog.bufs["pos"], prog.bufs[op.outputs[0]]]
    wg2 = min(64, prog.be.max_wg, max(m.reduce_wg, _pow2_floor(hd)))
    return [
        _Step(prog._algo(op, tensors, groups, wg, spec), i),
        _Step(prog._algo(op, merge, rows * nh, wg2, [nh, hd, chunk, chunks], ATTENTION_COMBINE)),
    ]


def _silu_mul(prog: VulkanProgram, op: Op, rows: int) -> list[_Step]:
    width = prog.width(op.inputs[0])
    tensors = _tensors(prog, op.inputs[:2])
    return [_Step(prog._algo(op, tensors, _ceil(rows * width, ELEMENTWISE_WG), ELEMENTWISE_WG, [width]))]


def _to_pipe_shader(prog: VulkanProgram, op: Op) -> ShaderKey:
    if prog.fused_residual:
        return "merge_add_f32", ()
    return ("quantize_q80" if prog.is_q80("zq") else "copy_slot"), ()


def _to_pipe(prog: VulkanProgram, op: Op, rows: int) -> list[_Step]:
    """This node's partial sum into its slot of zq, quantised when zq is a Q80 pipe; on one node straight
    into x instead (the residual add: merge_add's x + zq[slot 0] with zq[slot 0] a copy of y)."""
    width, slots, slot = prog.width(op.inputs[0]), prog.graph.slice.n_nodes, op.params["slot"]
    if prog.fused_residual:
        tensors = [prog.bufs[op.inputs[0]], prog.bufs["x"]]
        groups = _ceil(rows * width, ELEMENTWISE_WG)
        return [_Step(prog._algo(op, tensors, groups, ELEMENTWISE_WG, [width, 1]))]
    tensors = _tensors(prog, op.inputs + op.outputs)
    if prog.is_q80("zq"):
        nb = width // BLOCK
        groups = _ceil(_ceil(rows * slots * nb, 2), 64)
        return [_Step(prog._algo(op, tensors, groups, 64, [nb, nb * slots, nb * slot]))]
    groups = _ceil(rows * width, ELEMENTWISE_WG)
    return [_Step(prog._algo(op, tensors, groups, ELEMENTWISE_WG, [width, slots, slot]))]


def _merge_add(prog: VulkanProgram, op: Op, rows: int) -> list[_Step]:
    """x += every slot of zq; nothing on one node, where to_pipe added the only slot into x already."""
    if prog.fused_residual:
        return []
    dim = prog.width(op.outputs[0])
    tensors = _tensors(prog, op.inputs + op.outputs)
    groups = _ceil(rows * dim, ELEMENTWISE_WG)
    return [_Step(prog._algo(op, tensors, groups, ELEMENTWISE_WG, [dim, prog.graph.slice.n_nodes]))]


OPS: dict[str, _OpImpl] = {
    "embedding": _OpImpl(lambda prog, op: (f"embedding_{prog.weights[op.weight].dtype}", ()), _embedding),
    "rmsnorm": _OpImpl(_fixed("rmsnorm"), _rmsnorm),
    "add_bias": _OpImpl(_fixed("add_bias"), _add_bias),
    "quantize_q80": _OpImpl(_fixed("quantize_q80"), _quantize_q80),
    "matmul": _OpImpl(_matmul_shader, _matmul),
    "moe_route": _OpImpl(_fixed("moe_route"), _moe_route),
    "moe_matmul": _OpImpl(_moe_matmul_shader, _moe_matmul),
    "moe_sum": _OpImpl(_fixed("moe_sum"), _moe_sum),
    "rope": _OpImpl(_fixed("rope"), _rope),
    "kv_store": _OpImpl(_by_kv("kv_store"), _kv_store),
    "attention": _OpImpl(_by_kv("attention"), _attention),
    "silu_mul": _OpImpl(_fixed("silu_mul"), _silu_mul),
    "to_pipe": _OpImpl(_to_pipe_shader, _to_pipe),
    "merge_add": _OpImpl(_by_pipe("merge_add_f32", "merge_add_q80"), _merge_add),
}
OP_KINDS = frozenset(OPS)  # the op kinds this backend implements


# ---- fused runs of adjacent ops: one shader with the same arithmetic, in the same order, as the ops ----
@dataclass(frozen=True)
class _Run:
    """Ops recorded together: one op, or a run of a fusion; `keep`: the fusion's intermediate f32 result
    (the `kept` op's output) is read by a later op, so the fused shader writes it too."""

    ops: tuple[Op, ...]
    fusion: _Fusion | None = None
    keep: bool = False


@dataclass(frozen=True)
class _Fusion:
    """Adjacent op kinds one dispatch runs when `when(prog, *ops)` holds: `kept` indexes the op whose output
    is an intermediate result, which the shader writes only when a later op reads it (never, unless
    `keepable`: then a later reader prevents the fusion); `shader` and `bind` as in `_OpImpl`, for the run."""

    kinds: tuple[str, ...]
    when: Callable[..., bool]
    kept: int
    keepable: bool
    shader: Callable[[VulkanProgram, _Run], ShaderKey]
    bind: Callable[[VulkanProgram, _Run, int], list[_Step]]

    def match(self, prog: VulkanProgram, ops: list[Op], i: int, flat: list[Op], at: int) -> _Run | None:
        """The run of this fusion starting at ops[i] (flat[at] in the whole graph), or None."""
        run = tuple(ops[i : i + len(self.kinds)])
        if tuple(op.kind for op in run) != self.kinds or not self.when(prog, *run):
            return None
        keep = prog.read_later(flat, at + len(run), run[self.kept].outputs[0])
        return _Run(run, self, keep) if keep <= self.keepable else None


def _norm_quantized(prog: VulkanProgram, norm: Op, quant: Op) -> bool:
    """quant takes the norm's output, a whole-row norm over whole pairs of blocks (a workgroup per row owns
    its rows' words: 17 per pair)."""
    width = prog.width(norm.inputs[0])
    whole = prog.weights[norm.weight].cols == width and width % (2 * BLOCK) == 0
    return quant.inputs[0] == norm.outputs[0] and whole


def _silu_quantized(prog: VulkanProgram, silu: Op, quant: Op) -> bool:
    same = prog.width(silu.inputs[1]) == prog.width(silu.inputs[0])
    return quant.inputs[0] == silu.outputs[0] and same


def _keep(run: _Run) -> tuple[str, ...]:
    return ("KEEP_F32",) if run.keep else ()


def _rmsnorm_q80(prog: VulkanProgram, run: _Run, rows: int) -> list[_Step]:
    """rmsnorm's workgroup per token (its size, hence its reduction order), writing the Q80 blocks."""
    norm, quant = run.ops
    width = prog.width(norm.inputs[0])
    parts, i = _vector(prog, norm, width, "rmsnorm")
    eps = int(np.float32(norm.params["eps"]).view(np.uint32))
    wg = min(prog.be.tuning.reduce_wg, _pow2_floor(width))
    names = (norm.inputs[0], quant.outputs[0])
    tensors = [*_tensors(prog, names), *parts, *_tensors(prog, norm.outputs if run.keep else ())]
    shader = run.fusion.shader(prog, run)
    return [_Step(prog._algo(norm, tensors, rows, wg, [width, eps], shader), i)]


def _silu_mul_q80(prog: VulkanProgram, run: _Run, rows: int) -> list[_Step]:
    silu, quant = run.ops
    width = prog.width(silu.inputs[0])
    tensors = _tensors(prog, (*silu.inputs[:2], quant.outputs[0]))
    groups = _ceil(_ceil(rows * width // BLOCK, 2), 64)
    return [_Step(prog._algo(silu, tensors, groups, 64, [width], run.fusion.shader(prog, run)))]


def _gate_up_gated(prog: VulkanProgram, gate: Op, up: Op, silu: Op) -> bool:
    """gate and up multiply one x by weights of one type, shape and row pieces (a dispatch per piece binds
    both) into outputs of one width, and silu_mul gates gate's output by up's in place. The Q80 mat-vec
    paths' integer dot products (INT_DOT) fuse too: the shader is the matmul's, with a second weight."""
    wg, wu = prog.weights[gate.weight], prog.weights[up.weight]
    (g,), (u,) = gate.outputs, up.outputs
    same_x = gate.inputs == up.inputs and len(gate.inputs) == 1 and gate.inputs[0] not in (g, u)
    same_w = (wg.dtype, wg.shape) == (wu.dtype, wu.shape) and not wg.experts
    gated = silu.inputs == (g, u) and silu.outputs == (g,) and g != u and prog.width(g) == prog.width(u)
    pieces = [[(p.index, p.row0, p.rows) for p in prog.slots[op.weight]] for op in (gate, up)]
    return same_x and same_w and gated and pieces[0] == pieces[1]


def _gate_up_shader(prog: VulkanProgram, run: _Run) -> ShaderKey:
    name, flags = _matmul_shader(prog, run.ops[0])
    return name, (*flags, "GATE_UP")


def _gate_up_silu(prog: VulkanProgram, run: _Run, rows: int) -> list[_Step]:
    """The gate matmul's dispatches (mat-vec or mat-mat as it would run), the up weight's piece bound after
    each of the gate's."""
    gate, up, _ = run.ops
    pieces = [
        ([*g, *u], piece)
        for (g, piece), (u, _) in zip(prog._weight(gate.weight), prog._weight(up.weight), strict=True)
    ]
    return _matmul(prog, gate, rows, (pieces, run.fusion.shader(prog, run)))


def _ropes_stored(prog: VulkanProgram, rope_q: Op, rope_k: Op, store: Op) -> bool:
    """The graph's rope/rope/kv_store run, in place, on the pos pipe, with k and v of the cache's width."""
    in_place = rope_q.inputs[0] == rope_q.outputs[0] and rope_k.inputs[0] == rope_k.outputs[0]
    widths = prog.width(store.inputs[0]) == prog.width(store.inputs[1]) == prog.kv_width
    on_pos = store.inputs[2] == "pos"
    return ropes_then_store(rope_q, rope_k, store) and on_pos and in_place and widths


def _rope_kv_store(prog: VulkanProgram, run: _Run, rows: int) -> list[_Step]:
    """One invocation per pair of q values and per two k values of each row."""
    rope_q, _, store = run.ops
    (kc, i), (vc, _) = prog.k_cache.at(store.params["layer"]), prog.v_cache.at(store.params["layer"])
    q, k, v = (prog.bufs[n] for n in (rope_q.inputs[0], *store.inputs[:2]))
    tensors = [q, k, v, prog.bufs["pos"], prog.rope, kc, vc, _slot_buffer(prog)]
    qw, p, g = prog.width(rope_q.inputs[0]), rope_q.params, prog.graph
    spec = [qw, prog.kv_width, p["head_dim"], int(p["neox"]), g.max_seq_len, g.n_slots]
    groups = _ceil(rows * (qw + prog.kv_width) // 2, ELEMENTWISE_WG)
    shader = run.fusion.shader(prog, run)
    return [_Step(prog._algo(store, tensors, groups, ELEMENTWISE_WG, spec, shader), i)]


FUSIONS = (
    # the FFN's gate and up projections of one input and their gating (Q80 activations: then quantised apart)
    _Fusion(
        kinds=("matmul", "matmul", "silu_mul"),
        when=_gate_up_gated,
        kept=1,
        keepable=False,
        shader=_gate_up_shader,
        bind=_gate_up_silu,
    ),
    # the norm before matmuls with Q80 inputs, and the FFN's gating before its down projection (where the
    # gate and up matmuls stay apart)
    _Fusion(
        kinds=("rmsnorm", "quantize_q80"),
        when=_norm_quantized,
        kept=0,
        keepable=True,
        shader=lambda prog, run: ("rmsnorm_q80", _keep(run)),
        bind=_rmsnorm_q80,
    ),
    _Fusion(
        kinds=("silu_mul", "quantize_q80"),
        when=_silu_quantized,
        kept=0,
        keepable=True,
        shader=lambda prog, run: ("silu_mul_q80", _keep(run)),
        bind=_silu_mul_q80,
    ),
    # RoPE of q and of k by the same positions, then k and v into the cache (k itself is not rotated)
    _Fusion(
        kinds=("rope", "rope", "kv_store"),
        when=_ropes_stored,
        kept=1,
        keepable=False,
        shader=lambda prog, run: _by_kv("rope_kv_store")(prog, run.ops[2]),
        bind=_rope_kv_store,
    ),
)


def _impl(op: Op) -> _OpImpl:
    impl = OPS.get(op.kind)
    if impl is None:
        raise DllamaError(f"the Vulkan backend has no shader for op kind {op.kind!r}")
    return impl


def available_devices() -> list[DeviceInfo]:
    """The Vulkan devices in loader order (an empty list, not an error, when there is no loader or driver)."""
    try:
        return list_devices()
    except DllamaError:
        return []


def first_gpu(devices: list[DeviceInfo]) -> DeviceInfo | None:
    """The first device that is not a CPU implementation (what `--backend auto` picks)."""
    return next((d for d in devices if not d.is_cpu), None)
