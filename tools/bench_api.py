"""dllama-api continuous-batching benchmark: aggregate decode tokens/s of 4 concurrent streams vs 1 stream.

Starts `dllama-api --parallel 4` on the embedded SmolLM2, then alternates rounds of one stream and of four
concurrent streams (greedy, end-of-sequence masked, so every stream generates `--tokens`). Decode tokens/s
of a round: tokens after each stream's first, over the wall clock from the last first token to the last
token. Prints each round, the median ratio 4-stream / 1-stream (issue 14 target: >= 3) and the load average
(other work on the machine lowers both).

    python tools/bench_api.py [--tokens 48] [--rounds 3] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "Tell me a story about a lighthouse keeper.",
    "Explain how rivers shape valleys.",
    "Describe a market in a busy city.",
    "Write about a journey across the mountains.",
]


def start_server(log: Path, threads: int | None) -> tuple[subprocess.Popen, str]:
    """`dllama api --parallel 4 --port 0` in a subprocess; its base URL once /health answers 200."""
    extra = ["--nthreads", str(threads)] if threads else []
    argv = [sys.executable, "-m", "engine.cli", "api", "--port", "0", "--parallel", "4", *extra]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
    url = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited:\n{log.read_text()}")
        m = re.search(r"Server URL: (http://127\.0\.0\.1:\d+)/v1/", log.read_text(errors="replace"))
        if m:
            url = m.group(1)
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    return proc, url
            except httpx.HTTPError:
                pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"the server did not become ready (url {url})")


def stream(url: str, prompt: str, tokens: int, no_eos: dict[str, int]) -> list[float]:
    """One streaming chat request; the arrival time of every content chunk."""
    body = {
        "messages": [{"role": "user", "content": prompt}],
        "stream": True,
        "temperature": 0,
        "max_tokens": tokens,
        "logit_bias": no_eos,
    }
    times = []
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                times.append(time.monotonic())
    return times


def round_rate(url: str, n: int, tokens: int, no_eos: dict[str, int]) -> float:
    """Aggregate decode tokens/s of `n` concurrent streams (after every stream's first token)."""
    results: list[list[float]] = [[] for _ in range(n)]

    def run(i: int) -> None:
        results[i] = stream(url, PROMPTS[i % len(PROMPTS)], tokens, no_eos)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    start = max(ts[0] for ts in results)
    after = sum(1 for ts in results for t in ts if t > start)
    return after / (max(ts[-1] for ts in results) - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=48, help="tokens per stream")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of 1 stream then 4 streams")
    ap.add_argument("--threads", type=int, default=None, help="the server's --nthreads")
    args = ap.parse_args()
    from engine.catalog import resolve_model
    from engine.tokenizer import load_tokenizer

    no_eos = {str(t): -100 for t in load_tokenizer(resolve_model(None)).eos_ids}
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_server(Path(tmp) / "server.log", args.threads)
        try:
            round_rate(url, 4, 4, no_eos)  # warm-up
            ones, fours = [], []
            for k in range(args.rounds):
                ones.append(round_rate(url, 1, args.tokens, no_eos))
                fours.append(round_rate(url, 4, args.tokens, no_eos))
                print(f"round {k + 1}: 1 stream {ones[-1]:6.1f} tok/s   4 streams {fours[-1]:6.1f} tok/s")
        finally:
            proc.terminate()
            proc.wait(30)
    one, four = statistics.median(ones), statistics.median(fours)
    print(f"median: 1 stream {one:.1f} tok/s, 4 streams {four:.1f} tok/s aggregate, ratio {four / one:.2f}")
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())} ({os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
