"""CPU benchmark: decode and prefill tokens/s of a model vs this machine's streaming read bandwidth.

Decode: `--steps` generated tokens (greedy, past end-of-sequence). Prefill: prompts of each `--prefill`
length (median of 5 runs each). Prints the achieved weight bandwidth and the ratio achieved / streaming,
both measured in this same process (issue 2 target: decode ratio >= 0.25 with 2 threads).

    python tools/bench_cpu.py [--model /tmp/smol.m --tokenizer /tmp/smol.t] [--buffer-float-type q80]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from engine.generate import Metrics, generate
from engine.loader import load
from engine.sampler import Sampler

PROMPT = (
    "Distributed inference splits every weight matrix of a language model across several machines, "
    "so that each one reads only its share of the weights for every generated token. "
) * 3


def streaming_gbps(gib: float = 1.0, repeats: int = 5) -> float:
    """One numpy thread summing a float32 array of `gib` GiB: the best of `repeats` runs, in GB/s."""
    a = np.ones(int(gib * 2**30) // 4, dtype=np.float32)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - t0)
    return a.nbytes / best / 1e9


def prefill_rate(runner, ids: list[int], repeats: int = 5) -> float:
    """Tokens/s of one forward pass over `ids` from position 0 (median of `repeats`)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        runner.forward(ids, 0)
        times.append(time.perf_counter() - t0)
    return len(ids) / statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=None, help="GGUF or .m file (default: the embedded SmolLM2)")
    ap.add_argument("--tokenizer", default=None, help=".t file for a .m model")
    ap.add_argument("--nthreads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--prefill", type=int, nargs="*", default=[5, 60], help="prompt lengths to time")
    ap.add_argument("--buffer-float-type", default="f32")
    args = ap.parse_args()

    loaded = load(args.model, args.tokenizer, "cpu", args.buffer_float_type, args.nthreads, None)
    tok, runner = loaded.tokenizer, loaded.runner
    ids = tok.encode(PROMPT)
    while len(ids) < max(args.prefill, default=0):
        ids += ids
    sampler = Sampler(tok.vocab_size, temperature=0.0)
    for _ in generate(runner, tok, ids[:8], 4, sampler):  # warm-up: compile / load kernels
        pass
    m = Metrics()
    for _ in generate(runner, tok, ids[:16], args.steps, sampler, stop_at_eos=False, metrics=m):
        pass
    prefill = {n: prefill_rate(runner, ids[:n]) for n in args.prefill}
    stream = streaming_gbps()
    wb = runner.weight_bytes_per_token
    dec = Metrics.rate(m.decode)
    dec_gbps = dec * wb / 1e9
    print(f"backend            {runner.backend.description}, buffers {args.buffer_float_type}")
    print(f"weights per token  {wb / 1e6:.1f} MB")
    for n, rate in prefill.items():
        print(f"prefill {n:4d}       {rate:8.1f} tokens/s")
    print(f"decode             {dec:8.1f} tokens/s  ({m.decode.n_tokens} passes)  {dec_gbps:.2f} GB/s")
    print(f"streaming read     {stream:8.2f} GB/s  (one numpy thread, 1 GiB float32 sum)")
    print(f"decode ratio       {dec_gbps / stream:8.3f}  (achieved / streaming; target >= 0.25)")


if __name__ == "__main__":
    main()
