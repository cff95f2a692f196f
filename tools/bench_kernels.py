"""numba kernel benchmark: decode (B = 1) matmul of every weight type, float32 and Q80 activations.

Two Llama-1B-like shapes (2048 -> 8192, the gate/up projections, and 8192 -> 2048, the down projection) with
random valid blocks. Calls alternate over all cases in each repeat, so a load change on a shared machine hits
every type alike; the median per case is reported as µs per call, GB/s (weight bytes / time) and the ratio
to the q40 matmul of the same shape and activations. The process CPU time per call is reported beside it,
with its own ratio: time other processes take from these cores does not count there, so on a busy machine
it is the steadier figure. The issue's target: q4k and q6k at >= 0.8 of q40.

    python tools/bench_kernels.py [--nthreads 2] [--repeats 15] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cpu_fallback import kernels  # noqa: E402
from engine.weight_types import WEIGHT_TYPES, weight_type  # noqa: E402

SHAPES = ((2048, 8192), (8192, 2048))  # (cols in, rows out)
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
TARGET = 0.8  # GB/s of q4k and q6k relative to q40
MOE = (16, 8, 2048, 768)  # experts, slots, cols, rows: a Qwen3-30B-A3B gate projection, 16 of its 128 experts


def random_weight(wtype: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """A rows x cols weight in its native layout: random codes, the fp16 scale fields set to finite values."""
    t = weight_type(wtype)
    if not t.quantized:
        values = (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)
        if wtype == "bf16":
            return (values.view(np.uint32) >> 16).astype(np.uint16)
        return values.astype(np.float16) if wtype == "f16" else values
    blocks = rng.integers(0, 256, (rows, cols // t.block_values, t.block_bytes), dtype=np.uint8)
    for at, value in HALF_FIELDS[wtype].items():
        blocks[..., at : at + 2] = np.array([value], np.float16).view(np.uint8)
    return blocks.reshape(rows, -1)


def run(n_threads: int, repeats: int) -> list[dict]:
    """Times every (type, shape, activation) case; returns one record per case."""
    kernels.set_threads(n_threads)
    rng = np.random.default_rng(0)
    cases = []
    for cols, rows in SHAPES:
        x = rng.standard_normal((1, cols)).astype(np.float32)
        xq = np.empty((1, cols // 32 * 34), np.uint8)
        kernels.quantize_q80(x, xq)
        for wtype in WEIGHT_TYPES:
            w = random_weight(wtype, rows, cols, rng)
            out = np.empty((1, rows), np.float32)
            for act, fn, xin in (("f32", kernels.matmul, x), ("q80", kernels.matmul_q80, xq)):
                fn(w, wtype, xin, out)  # compile or load from the cache, fault the pages in
                cases.append(
                    {
                        "wtype": wtype,
                        "cols": cols,
                        "rows": rows,
                        "act": act,
                        "bytes": w.nbytes,
                        "call": (fn, w, wtype, xin, out),
                        "wall": [],
                        "cpu": [],
                    }
                )
    for _ in range(repeats):
        for case in cases:
            fn, *args = case["call"]
            t0, c0 = time.perf_counter(), time.process_time()
            fn(*args)
            case["cpu"].append(time.process_time() - c0)
            case["wall"].append(time.perf_counter() - t0)
    records = []
    for case in cases:
        t, c = statistics.median(case["wall"]), statistics.median(case["cpu"])
        records.append(
            {k: case[k] for k in ("wtype", "cols", "rows", "act", "bytes")}
            | {"us": t * 1e6, "gbps": case["bytes"] / t / 1e9, "cpu_us": c * 1e6}
        )
    base = {(r["cols"], r["act"]): r for r in records if r["wtype"] == "q40"}
    for r in records:
        q40 = base[r["cols"], r["act"]]
        r["vs_q40"] = r["gbps"] / q40["gbps"]
        r["vs_q40_cpu"] = q40["cpu_us"] / q40["bytes"] * r["bytes"] / r["cpu_us"]
    return records


def run_moe(repeats: int) -> list[dict]:
    """Decode moe_matmul (k slots in one call) against k separate matmuls over the same experts."""
    n_e, k, cols, rows = MOE
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1, cols)).astype(np.float32)
    xq = np.empty((1, cols // 32 * 34), np.uint8)
    kernels.quantize_q80(x, xq)
    idx = rng.choice(n_e, (1, k), replace=False).astype(np.int32)
    records = []
    for wtype in ("q4k", "q6k", "q40"):
        stack = np.stack([random_weight(wtype, rows, cols, rng) for _ in range(n_e)])
        for act, xin, moe, dense in (
            ("f32", x, kernels.moe_matmul, kernels.matmul),
            ("q80", xq, kernels.moe_matmul_q80, kernels.matmul_q80),
        ):
            out = np.empty((1, k * rows), np.float32)
            calls = {
                "moe": [(moe, (stack, wtype, xin, idx, out))],
                "dense": [
                    (dense, (stack[e], wtype, xin, out[:, s * rows : (s + 1) * rows]))
                    for s, e in enumerate(idx[0])
                ],
            }
            times = {name: [] for name in calls}
            for rep in range(repeats + 1):  # the first round compiles or loads the kernels
                for name, steps in calls.items():
                    t0 = time.perf_counter()
                    for fn, fn_args in steps:
                        fn(*fn_args)
                    if rep:
                        times[name].append(time.perf_counter() - t0)
            moe_us, dense_us = (statistics.median(times[n]) * 1e6 for n in ("moe", "dense"))
            records.append({"wtype": wtype, "act": act, "moe_us": moe_us, "dense_us": dense_us})
    return records


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nthreads", type=int, default=2, help="numba threads (default 2)")
    ap.add_argument("--repeats", type=int, default=15, help="timed calls per case (default 15)")
    ap.add_argument("--json", type=Path, help="also write the records here")
    args = ap.parse_args()
    load_before = os.getloadavg()
    records = run(args.nthreads, args.repeats)
    load_after = os.getloadavg()
    print(
        f"{args.nthreads} threads, median of {args.repeats}; load average before "
        f"{' '.join(f'{v:.2f}' for v in load_before)}, after {' '.join(f'{v:.2f}' for v in load_after)}"
    )
    print(
        f"{'type':5} {'shape':>11} {'act':4} {'µs':>9} {'GB/s':>7} {'vs q40':>7} {'cpu µs':>9} {'(cpu)':>6}"
    )
    for r in records:
        shape = f"{r['cols']}->{r['rows']}"
        low = r["wtype"] in ("q4k", "q6k") and min(r["vs_q40"], r["vs_q40_cpu"]) < TARGET
        print(
            f"{r['wtype']:5} {shape:>11} {r['act']:4} {r['us']:9.1f} {r['gbps']:7.2f} {r['vs_q40']:7.2f} "
            f"{r['cpu_us']:9.1f} {r['vs_q40_cpu']:6.2f}{'  < target' if low else ''}"
        )
    moe = run_moe(args.repeats)
    n_e, k, cols, rows = MOE
    print(f"\nMoE decode, {k} of {n_e} experts {cols}->{rows}: one moe_matmul vs {k} matmuls")
    print(f"{'type':5} {'act':4} {'moe µs':>9} {f'{k}x µs':>9} {'ratio':>6}")
    for r in moe:
        ratio = r["moe_us"] / r["dense_us"]
        print(f"{r['wtype']:5} {r['act']:4} {r['moe_us']:9.1f} {r['dense_us']:9.1f} {ratio:6.2f}")
    if args.json:
        report = {"threads": args.nthreads, "repeats": args.repeats, "loadavg": [load_before, load_after]}
        args.json.write_text(json.dumps(report | {"records": records, "moe": moe}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
