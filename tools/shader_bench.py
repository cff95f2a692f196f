"""Shader benchmark: µs, GB/s and GFLOP/s of every Vulkan shader at the embedded model's and Llama 3.1 8B's
shapes (one decode token), next to the same op on the CPU backend and to the device's measured copy bandwidth.
On a device with packed integer dot products, 32-value block weights times Q80 activations are timed in both
forms: `matmul_<type>/q80` the float one, `matmul_<type>/q80-idot` the INT_DOT one (what the device runs).

Each case compiles a one-op graph with the backend's own buffers, weight packing and grids, records the
dispatch K times in one sequence (K sized so an eval lasts a few ms, amortising submission) and reports the
median over repeats after warm-up. Random weights are generated directly in their block format.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from cpu_fallback import kernels
from engine.config import ModelConfig
from engine.errors import DllamaError
from engine.graph import BufferSpec, Graph, Op, Segment
from engine.slicing import node_slice
from engine.weight_types import WEIGHT_TYPES, row_bytes, weight_type
from engine.weights import Weight
from shaders.backend import (
    MATMAT_BATCH,
    MATMAT_ROWS,
    MATMAT_WG,
    VulkanBackend,
    VulkanProgram,
    _grid,
    _push,
)
from shaders.weights import weight_parts

WTYPES = tuple(WEIGHT_TYPES)  # every weight type of the registry
Q80_ACT_WTYPES = tuple(t for t in WTYPES if weight_type(t).quantized)
INT_DOT_WTYPES = tuple(t for t in Q80_ACT_WTYPES if weight_type(t).block_values == 32)  # INT_DOT shaders
# fp16 fields (byte offset -> value) of a random block: small scales, negative minimums
HALF_FIELDS = {
    "q40": {0: 0.01},
    "q41": {0: 0.01, 2: -0.08},
    "q50": {0: 0.01},
    "q51": {0: 0.01, 2: -0.08},
    "q80": {0: 0.01},
    "q4k": {0: 0.001, 2: 0.002},
    "q5k": {0: 0.001, 2: 0.002},
    "q6k": {208: 0.0005},
}
EMULATION_LABEL = "CPU emulation (lavapipe) — not GPU performance"
TARGET_EVAL_S = 0.004  # one timed sequence lasts about this long
MAX_DISPATCHES = 64  # per recorded sequence


@dataclass(frozen=True)
class Shape:
    """The decode-time dimensions of one model."""

    name: str
    dim: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    def config(self, max_seq: int) -> ModelConfig:
        return ModelConfig(
            arch="llama",
            dim=self.dim,
            hidden_dim=self.hidden,
            n_layers=1,
            n_heads=self.heads,
            n_kv_heads=self.kv_heads,
            head_dim=self.head_dim,
            vocab_size=self.vocab,
            context_len=max_seq,
        )


SMOLLM2 = Shape("SmolLM2-135M", 576, 1536, 9, 3, 64, 49152)
LLAMA8B = Shape("Llama-3.1-8B", 4096, 14336, 32, 8, 128, 128256)
EMBEDDING_ROWS = 4096  # embedding reads one row whatever the vocabulary: a slice of it is enough


@dataclass
class Case:
    """One shader at one shape: a one-op graph, the bytes and flops of a dispatch, and the CPU equivalent."""

    shader: str
    shape: Shape
    detail: str
    op: Op
    buffers: dict[str, BufferSpec]
    nbytes: int
    flops: int
    cpu: Callable[[], None]
    weights: dict[str, Weight] = field(default_factory=dict)
    act: str = "f32"
    max_seq: int = 16
    pos: int = 0
    matmul: bool = False
    int_dot: bool = False  # a Q80 matmul in the INT_DOT form (else the float form)


def _rand(rng: np.random.Generator, shape, scale: float = 1.0) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)


def random_weight(name: str, wtype: str, rows: int, cols: int, rng: np.random.Generator) -> Weight:
    """A random matrix stored as `wtype`: quantised blocks are random bytes with small, finite scales."""
    wt = weight_type(wtype)
    if not wt.quantized:
        f = _rand(rng, (rows, cols), 1 / np.sqrt(cols))
        data = {"f32": f, "f16": f.astype(np.float16), "bf16": (f.view(np.uint32) >> 16).astype(np.uint16)}
        return Weight(name, wtype, rows, cols, data[wtype])
    blocks = rng.integers(0, 256, (rows, cols // wt.block_values, wt.block_bytes), dtype=np.uint8)
    for off, value in HALF_FIELDS[wtype].items():
        blocks[:, :, off : off + 2] = np.frombuffer(np.float16(value).tobytes(), np.uint8)
    return Weight(name, wtype, rows, cols, blocks.reshape(rows, row_bytes(wtype, cols)))


def _q80(x: np.ndarray) -> np.ndarray:
    out = np.zeros((x.shape[0], row_bytes("q80", x.shape[1])), np.uint8)
    kernels.quantize_q80(x, out)
    return out


def matmul_case(shape: Shape, wtype: str, act: str, rng: np.random.Generator, int_dot: bool = False) -> Case:
    """The FFN down projection (dim x hidden), the largest per-layer matrix, with f32 or Q80 activations
    (`int_dot`: the INT_DOT shader). Its rows (hidden values) are whole K-quant super-blocks at both shapes,
    which the dim-long rows of the up projection are not for SmolLM2 (576)."""
    rows, cols = shape.dim, shape.hidden
    w = random_weight("blk.0.ffn_down.weight", wtype, rows, cols, rng)
    x = _rand(rng, (1, cols))
    out = np.zeros((1, rows), np.float32)
    xin = "h_q" if act == "q80" else "h"
    spec = BufferSpec(cols, act)
    if act == "q80":
        xq = _q80(x)

        def cpu() -> None:
            kernels.matmul_q80(w.data, wtype, xq, out)
    else:

        def cpu() -> None:
            kernels.matmul(w.data, wtype, x, out)

    return Case(
        f"matmul_{wtype}" + ("/q80" if act == "q80" else "") + ("-idot" if int_dot else ""),
        shape,
        f"{rows}x{cols}",
        Op("matmul", "mm", (xin,), ("y",), w.name),
        {xin: spec, "y": BufferSpec(rows)},
        w.data.nbytes + spec.row_bytes + rows * 4,
        2 * rows * cols,
        cpu,
        {w.name: w},
        act,
        matmul=True,
        int_dot=int_dot,
    )


def rmsnorm_case(shape: Shape, rng: np.random.Generator) -> Case:
    d = shape.dim
    w = Weight("blk.0.attn_norm.weight", "f32", 1, d, _rand(rng, (1, d), 0.1) + 1)
    x, out = _rand(rng, (1, d)), np.zeros((1, d), np.float32)
    return Case(
        "rmsnorm",
        shape,
        f"{d}",
        Op("rmsnorm", "norm", ("x",), ("h",), w.name, {"eps": 1e-5}),
        {"x": BufferSpec(d), "h": BufferSpec(d)},
        3 * d * 4,
        4 * d,
        lambda: kernels.rmsnorm(x, w.data.reshape(-1), 1e-5, out),
        {w.name: w},
    )


def rope_case(shape: Shape, rng: np.random.Generator) -> Case:
    hd, width, seq, pos = shape.head_dim, shape.heads * shape.head_dim, 1024, 700
    q = _rand(rng, (1, width))
    cos, sin = kernels.rope_table(hd, 10000.0, False, None, None, seq)
    positions = np.array([pos], np.int32)
    return Case(
        "rope",
        shape,
        f"{shape.heads}x{hd}",
        Op("rope", "rope_q", ("q", "pos"), ("q",), None, {"head_dim": hd, "neox": False}),
        {"q": BufferSpec(width)},
        2 * width * 4 + hd * 4,
        3 * width,
        lambda: kernels.rope(q, positions, cos, sin, hd, False),
        max_seq=seq,
        pos=pos,
    )


def attention_case(shape: Shape, pos: int, rng: np.random.Generator) -> Case:
    """Decode attention of one token at `pos` over pos + 1 cached rows."""
    nh, nkv, hd = shape.heads, shape.kv_heads, shape.head_dim
    kvw, seq = nkv * hd, pos + 1
    q = _rand(rng, (1, nh * hd))
    kc, vc = _rand(rng, (seq, kvw)), _rand(rng, (seq, kvw))
    out, scratch = np.zeros((1, nh * hd), np.float32), np.zeros((nh, seq), np.float32)
    positions = np.array([pos], np.int32)
    att = dict(layer=0, n_heads=nh, n_kv_heads=nkv, head_dim=hd, group=nh // nkv, q_offset=0)
    return Case(
        f"attention@{pos}",
        shape,
        f"{nh}/{nkv}x{hd}",
        Op("attention", "att", ("q", "pos"), ("att",), None, att),
        {"q": BufferSpec(nh * hd), "att": BufferSpec(nh * hd)},
        (2 * nh * hd + 2 * seq * kvw) * 4,
        4 * nh * hd * seq,
        lambda: kernels.attention(q, kc, vc, positions, nh, nkv, hd, out, scratch),
        max_seq=seq,
        pos=pos,
    )


def silu_mul_case(shape: Shape, rng: np.random.Generator) -> Case:
    n = shape.hidden
    gate, up = _rand(rng, (1, n)), _rand(rng, (1, n))
    return Case(
        "silu_mul",
        shape,
        f"{n}",
        Op("silu_mul", "act", ("gate", "up"), ("gate",)),
        {"gate": BufferSpec(n), "up": BufferSpec(n)},
        3 * n * 4,
        5 * n,
        lambda: kernels.silu_mul(gate, up),
    )


def quantize_case(shape: Shape, rng: np.random.Generator) -> Case:
    d = shape.dim
    x, out = _rand(rng, (1, d)), np.zeros((1, row_bytes("q80", d)), np.uint8)
    return Case(
        "quantize_q80",
        shape,
        f"{d}",
        Op("quantize_q80", "quant", ("h",), ("h_q",)),
        {"h": BufferSpec(d), "h_q": BufferSpec(d, "q80")},
        d * 4 + out.nbytes,
        3 * d,
        lambda: kernels.quantize_q80(x, out),
    )


def merge_add_case(shape: Shape, act: str, rng: np.random.Generator) -> Case:
    """x += the sync pipe zq (one node's slot), in f32 or Q80."""
    d = shape.dim
    x, y = _rand(rng, (1, d)), _rand(rng, (1, d))
    if act == "q80":
        yq = _q80(y)
        cpu, zq_bytes = (lambda: kernels.merge_add_q80(x, yq)), yq.nbytes
    else:
        cpu, zq_bytes = (lambda: kernels.add(x, y)), d * 4
    return Case(
        f"merge_add_{act}",
        shape,
        f"{d}",
        Op("merge_add", "merge", ("zq",), ("x",)),
        {"x": BufferSpec(d)},
        zq_bytes + 2 * d * 4,
        2 * d,
        cpu,
        act=act,
    )


def embedding_case(shape: Shape, rng: np.random.Generator) -> Case:
    """One token's row of a Q4_0 embedding table, de-quantised to f32."""
    d, rows = shape.dim, min(shape.vocab, EMBEDDING_ROWS)
    w = random_weight("token_embd.weight", "q40", rows, d, rng)
    tokens, out = np.array([rows // 2], np.int32), np.zeros((1, d), np.float32)
    return Case(
        "embedding_q40",
        shape,
        f"{d}",
        Op("embedding", "embedding", ("tok",), ("x",), w.name),
        {"x": BufferSpec(d)},
        row_bytes("q40", d) + d * 4,
        d,
        lambda: kernels.embedding(w.data, "q40", tokens, out),
        {w.name: w},
    )


def build_cases(
    shape: Shape, positions: list[int], seed: int = 0, int_dot: bool = False
) -> list[Callable[[], Case]]:
    """Every benchmarked shader at `shape`, as builders (a case's weights exist only while it runs); with
    `int_dot` the INT_DOT matmuls beside the float ones."""
    rng = np.random.default_rng(seed)
    builders: list[Callable[[], Case]] = [lambda t=t: matmul_case(shape, t, "f32", rng) for t in WTYPES]
    builders += [lambda t=t: matmul_case(shape, t, "q80", rng) for t in Q80_ACT_WTYPES]
    if int_dot:
        builders += [lambda t=t: matmul_case(shape, t, "q80", rng, True) for t in INT_DOT_WTYPES]
    builders += [
        lambda: rmsnorm_case(shape, rng),
        lambda: rope_case(shape, rng),
        *[lambda p=p: attention_case(shape, p, rng) for p in positions],
        lambda: silu_mul_case(shape, rng),
        lambda: quantize_case(shape, rng),
        lambda: merge_add_case(shape, "f32", rng),
        lambda: merge_add_case(shape, "q80", rng),
        lambda: embedding_case(shape, rng),
    ]
    return builders


class Bench:
    """Times cases on one Vulkan backend; where it uses INT_DOT, the float form's cases run on a second
    backend of the same device and tuning with int_dot off."""

    def __init__(self, be: VulkanBackend, repeats: int):
        self.be, self.kp, self.repeats = be, be.kp, repeats
        self.float_be = be
        if be.int_dot:
            self.float_be = VulkanBackend(
                be.device.index, be.subgroups, dataclasses.replace(be.tuning, int_dot=False)
            )

    def _copy_algo(self, src, dst, words: int):
        spec = np.array([256], np.uint32)
        algo = self.be.manager.algorithm(
            [src, dst], self.be.shader("copy_words"), _grid(-(-words // 256)), spec, _push()
        )
        return algo, _push(words, 0)

    def _fill(self, dst, data: np.ndarray) -> None:
        words = np.zeros(-(-data.nbytes // 4), np.uint32)
        words.view(np.uint8)[: data.nbytes] = data.reshape(-1).view(np.uint8)
        host = self.be.manager.tensor_t(words, self.kp.TensorTypes.host)
        algo, push = self._copy_algo(host, dst, words.size)
        self.be.manager.sequence().record(self.kp.OpAlgoDispatch(algo, push)).eval()

    def time_dispatches(self, dispatches: list[tuple[object, np.ndarray]]) -> float:
        """Median seconds of one pass over `dispatches`, recorded K times per sequence."""

        def sequence(k: int):
            seq = self.be.manager.sequence()
            for _ in range(k):
                for algo, push in dispatches:
                    seq.record(self.kp.OpAlgoDispatch(algo, push))
            return seq

        one = sequence(1)
        one.eval()
        t0 = time.perf_counter()
        one.eval()
        first = time.perf_counter() - t0
        k = int(min(MAX_DISPATCHES, max(1, TARGET_EVAL_S // max(first, 1e-7))))
        seq = sequence(k) if k > 1 else one
        seq.eval()
        times = []
        for _ in range(self.repeats):
            t0 = time.perf_counter()
            seq.eval()
            times.append((time.perf_counter() - t0) / k)
        return statistics.median(times)

    def copy_gbps(self, mib: int) -> float:
        """Device copy bandwidth (bytes read + written) of the copy_words shader between device buffers."""
        words = mib << 18
        src = self.be.manager.tensor_t(np.zeros(words, np.uint32), self.kp.TensorTypes.storage)
        dst = self.be.manager.tensor_t(np.zeros(words, np.uint32), self.kp.TensorTypes.storage)
        self._fill(src, np.ones(words, np.uint32))
        seconds = self.time_dispatches([self._copy_algo(src, dst, words)])
        return 2 * words * 4 / seconds / 1e9

    def gpu_seconds(self, case: Case) -> float:
        """Seconds per run of the case's op (its dispatches), with every input holding finite data."""
        cfg = case.shape.config(case.max_seq)
        bufs = {"tok": BufferSpec(1, "i32"), "pos": BufferSpec(1, "i32"), "zq": BufferSpec(cfg.dim, case.act)}
        bufs.update(case.buffers)
        graph = Graph(cfg, node_slice(cfg, 0, 1), case.act, case.max_seq, bufs, [Segment([case.op])])
        prog = VulkanProgram(self.be if case.int_dot else self.float_be, graph, case.weights, 1)
        if case.matmul and ("INT_DOT" in prog.shader_variant(case.op.name)[1]) != case.int_dot:
            raise DllamaError(
                f"{case.shader} did not compile to the {'INT_DOT' if case.int_dot else 'float'} form"
            )
        rng = np.random.default_rng(1)
        for name, spec in bufs.items():
            if spec.dtype == "i32":
                continue
            x = rng.standard_normal((1, spec.width), dtype=np.float32)
            data = _q80(x) if spec.dtype == "q80" else x
            if name in prog.views:
                prog.views[name][:] = data
            else:
                self._fill(prog.bufs[name], data)
        prog.views["pos"][0, 0] = case.pos
        prog.views["tok"][0, 0] = prog.vocab // 2
        staged = [
            prog.bufs["tok"],
            prog.bufs["pos"],
        ]  # device-local: runs copy them in, raw dispatches do not
        self.be.manager.sequence().record(self.kp.OpTensorSyncDevice(staged)).eval()
        if case.op.kind == "attention":
            kv = rng.standard_normal(case.max_seq * prog.kv_width, dtype=np.float32)
            self._fill(prog.k_cache.tensors[0], kv)
            self._fill(prog.v_cache.tensors[0], kv[::-1].copy())
        steps = prog._bind(case.op, 1)
        seconds = self.time_dispatches([(step.algo, _push(1, step.aux, step.rows)) for step in steps])
        del prog, steps
        gc.collect()
        return seconds


def cpu_seconds(case: Case, repeats: int) -> float:
    """Median seconds per call of the CPU kernel, calls batched like the dispatches, after a warm-up call
    (which also loads or compiles it)."""
    case.cpu()
    t0 = time.perf_counter()
    case.cpu()
    k = int(min(MAX_DISPATCHES, max(1, TARGET_EVAL_S // max(time.perf_counter() - t0, 1e-7))))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(k):
            case.cpu()
        times.append((time.perf_counter() - t0) / k)
    return statistics.median(times)


def too_large(case: Case, limit: int) -> str:
    """Why the device cannot bind one of the case's weight buffers, or "" when it can."""
    for w in case.weights.values():
        largest = max(p.words * 4 for p in weight_parts(w))
        if largest > limit:
            return f"a {largest >> 20} MiB weight buffer exceeds the device's {limit >> 20} MiB binding limit"
    return ""


def device_label(be: VulkanBackend) -> str:
    """The device as the report names it; CPU implementations are marked as emulation."""
    dev = be.device
    if dev.is_cpu:
        if "llvmpipe" in dev.name.lower() or "lavapipe" in dev.name.lower():
            return f"{dev.name}: {EMULATION_LABEL}"
        return f"{dev.name}: CPU emulation — not GPU performance"
    return f"{dev.name} ({dev.kind})"


def matmul_variant(be: VulkanBackend) -> dict:
    """The matmul work split chosen for the device (specialization constants) and the mat-mat tile."""
    tile = {"rows": MATMAT_ROWS, "batch": MATMAT_BATCH, "workgroup": MATMAT_WG}
    return {**asdict(be.tuning), "int_dot": be.int_dot, "subgroups": be.subgroups, "matmat_tile": tile}


def result(case: Case, gpu_s: float, cpu_s: float, copy_gbps: float) -> dict:
    """One row of the report (µs, GB/s of bytes read + written, GFLOP/s)."""
    gbps = case.nbytes / gpu_s / 1e9
    row = {
        "shader": case.shader,
        "model": case.shape.name,
        "shape": case.detail,
        "bytes": case.nbytes,
        "flops": case.flops,
        "gpu_us": gpu_s * 1e6,
        "gpu_gbps": gbps,
        "gpu_gflops": case.flops / gpu_s / 1e9,
        "cpu_us": cpu_s * 1e6,
        "cpu_gbps": case.nbytes / cpu_s / 1e9,
    }
    if case.matmul:
        row["copy_fraction"] = gbps / copy_gbps
    return row


def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{report['device']['label']} — copy bandwidth {report['copy_gbps']:.1f} GB/s")
    for col in ("model", "shader", "shape", "µs", "GB/s", "GFLOP/s", "of copy", "CPU µs", "CPU GB/s"):
        table.add_column(col, justify="left" if col in ("model", "shader", "shape") else "right")
    for r in report["results"]:
        frac = f"{100 * r['copy_fraction']:.0f}%" if "copy_fraction" in r else ""
        table.add_row(
            r["model"],
            r["shader"],
            r["shape"],
            f"{r['gpu_us']:.1f}",
            f"{r['gpu_gbps']:.2f}",
            f"{r['gpu_gflops']:.2f}",
            frac,
            f"{r['cpu_us']:.1f}",
            f"{r['cpu_gbps']:.2f}",
        )
    console = Console(width=140)
    console.print(table)
    for r in report["skipped"]:
        console.print(f"skipped {r['model']} {r['shader']}: {r['reason']}")


def plot(report: dict, path: str) -> None:
    """Horizontal bars of GB/s per shader (device and CPU), one panel per model, copy bandwidth as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in report["results"]))
    rows = [[r for r in report["results"] if r["model"] == m] for m in models]
    fig, axes = plt.subplots(
        1, len(models), figsize=(7 * len(models), 0.32 * max(map(len, rows)) + 1.8), squeeze=False
    )
    for ax, model, rs in zip(axes[0], models, rows, strict=True):
        y = np.arange(len(rs))
        ax.barh(y - 0.2, [r["gpu_gbps"] for r in rs], 0.4, label="Vulkan shader", color="#3b7dd8")
        ax.barh(y + 0.2, [r["cpu_gbps"] for r in rs], 0.4, label="CPU backend", color="#e8903a")
        ax.axvline(report["copy_gbps"], color="#444", ls="--", lw=1, label="device copy bandwidth")
        ax.set_yticks(y, [r["shader"] for r in rs])
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel("GB/s (bytes read + written), log scale")
        ax.set_title(model)
        ax.grid(axis="x", which="both", alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(report["device"]["label"])
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=110)
    except OSError as e:
        raise DllamaError(f"cannot write the plot {path}: {e.strerror}") from None
    finally:
        plt.close(fig)


def run(quick: bool, gpu_index: int | None, repeats: int | None, progress: bool = True) -> dict:
    """Benchmark every case (the embedded model's shapes only when quick) and return the report."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    be = VulkanBackend(gpu_index)
    repeats = repeats or (3 if quick else 7)
    bench = Bench(be, repeats)
    plan = [(SMOLLM2, [256] if quick else [64, 512, 4095])]
    if not quick:
        plan.append((LLAMA8B, [64, 512, 4095]))
    builders = [b for shape, pos in plan for b in build_cases(shape, pos, int_dot=be.int_dot)]
    console = Console(stderr=True)
    results, skipped = [], []
    with Progress(
        TextColumn("{task.description:<34}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        disable=not progress,
        transient=True,
    ) as bar:
        task = bar.add_task("device copy bandwidth", total=len(builders) + 1)
        copy = bench.copy_gbps(min(32 if quick or be.device.is_cpu else 512, be.buffer_limit >> 21))
        bar.advance(task)
        for build in builders:
            case = build()
            bar.update(task, description=f"{case.shape.name} {case.shader}")
            too_big = too_large(case, be.buffer_limit)
            if too_big:
                skipped.append({"shader": case.shader, "model": case.shape.name, "reason": too_big})
            else:
                results.append(result(case, bench.gpu_seconds(case), cpu_seconds(case, repeats), copy))
            bar.advance(task)
            del case
    dev = be.device
    return {
        "device": {
            "name": dev.name,
            "kind": dev.kind,
            "emulated": dev.is_cpu,
            "label": device_label(be),
            "description": be.description,
            "matmul": matmul_variant(be),
        },
        "quick": quick,
        "repeats": repeats,
        "copy_gbps": copy,
        "results": results,
        "skipped": skipped,
    }


def main(argv: list[str] | None = None) -> None:
    """Command line of the benchmark (also `dllama bench-shaders`)."""
    ap = argparse.ArgumentParser(prog="dllama bench-shaders", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the embedded model's shapes only, few repeats")
    ap.add_argument("--json", metavar="FILE", help="write the report as one JSON object")
    ap.add_argument("--plot", metavar="FILE.png", help="write a bar chart of GB/s per shader")
    ap.add_argument("--gpu-index", type=int, default=None, help="Vulkan device (default: the first)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per case (default 7, quick 3)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    args = ap.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        raise DllamaError(f"--repeats must be at least 1 (got {args.repeats})")
    for out in (args.json, args.plot):
        if out and not Path(out).resolve().parent.is_dir():
            raise DllamaError(f"cannot write {out}: its folder does not exist")
    report = run(args.quick, args.gpu_index, args.repeats, not args.no_progress)
    print_table(report)
    if args.json:
        try:
            Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
        except OSError as e:
            raise DllamaError(f"cannot write {args.json}: {e.strerror}") from None
    if args.plot:
        plot(report, args.plot)


if __name__ == "__main__":
    try:
        main()
    except DllamaError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
