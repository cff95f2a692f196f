"""Cluster benchmark over real network paths: 1, 2 and 3 nodes on loopback and across network namespaces.

As root (with iproute2) it builds one namespace per node: the root's holds a bridge, every worker's a veth
into it (10.213.0.x/24), optionally shaped with `tc` (`--rate` alone uses tbf; `--delay` needs netem), and
runs `dllama worker` in each and `dllama inference` in the root's. Traffic stays on loopback and inside the
namespaces it creates; every process it starts is killed and every namespace deleted on exit, and the
whole run is bounded by `--timeout`. Prints per generated token: compute (eval) and sync time, payload bytes
sent and received by the root, and tokens/s. `--hetero` adds a 2-node case whose worker shares its core with a
busy process (the even split against `--split auto`); `--startup` the time to a first token with a cold and a
warm worker slice cache (in the namespaces, shaped by `--rate`, where they can be made).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SUBNET = "10.213.0"
PORT = 9990
PROMPT = "Distributed inference splits every weight matrix of a language model across several machines"


@dataclass
class Result:
    setting: str
    nodes: int
    tokens: int
    eval_ms: float
    sync_ms: float
    sent_bytes: float  # payload bytes per generated token, at the root
    recv_bytes: float
    tokens_per_s: float  # end to end (sampling, detokenising and the network included)
    sync_ms_per_exchange: float  # the root's sync time per network step (broadcast, all-slices, gather)


class Deadline:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise TimeoutError("the benchmark ran past --timeout")
        return left


def sh(*cmd: str) -> None:
    """Run an `ip`/`tc` command; its stderr becomes the error."""
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")


class Namespaces:
    """Node i lives in namespace <prefix>i at 10.213.0.(i+1); node 0's namespace holds the bridge."""

    def __init__(self, n_nodes: int, rate: str | None, delay: str | None):
        self.prefix = f"dllb{os.getpid()}n"
        self.names: list[str] = []
        self.n_nodes, self.rate, self.delay = n_nodes, rate, delay

    def __enter__(self) -> Namespaces:
        try:
            for i in range(self.n_nodes):
                ns = self.prefix + str(i)
                sh("ip", "netns", "add", ns)
                self.names.append(ns)
                sh("ip", "-n", ns, "link", "set", "lo", "up")
            root = self.names[0]
            sh("ip", "-n", root, "link", "add", "br0", "type", "bridge")
            sh("ip", "-n", root, "addr", "add", f"{SUBNET}.1/24", "dev", "br0")
            sh("ip", "-n", root, "link", "set", "br0", "up")
            for i in range(1, self.n_nodes):
                ns, port = self.names[i], f"p{i}"
                sh(
                    "ip",
                    "link",
                    "add",
                    port,
                    "netns",
                    root,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "eth0",
                    "netns",
                    ns,
                )
                sh("ip", "-n", root, "link", "set", port, "master", "br0")
                sh("ip", "-n", root, "link", "set", port, "up")
                sh("ip", "-n", ns, "addr", "add", f"{SUBNET}.{i + 1}/24", "dev", "eth0")
                sh("ip", "-n", ns, "link", "set", "eth0", "up")
                self._shape(root, port)
                self._shape(ns, "eth0")
        except BaseException:
            self.__exit__()
            raise
        return self

    def _shape(self, ns: str, dev: str) -> None:
        """Shape the egress of one link end: netem for a delay (with its rate), else tbf for a rate."""
        if self.delay:
            rate = ["rate", self.rate] if self.rate else []
            try:
                sh("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "netem", "delay", self.delay, *rate)
            except RuntimeError as e:
                raise RuntimeError(f"{e} (no sch_netem in this kernel? --rate alone uses tbf)") from None
        elif self.rate:
            sh(
                "tc",
                "-n",
                ns,
                "qdisc",
                "add",
                "dev",
                dev,
                "root",
                "tbf",
                "rate",
                self.rate,
                "burst",
                "256kb",
                "latency",
                "50ms",
            )

    def exec(self, node: int) -> list[str]:
        return ["ip", "netns", "exec", self.names[node]]

    def __exit__(self, *exc: object) -> None:
        for ns in reversed(self.names):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        self.names = []


class Worker:
    """A `dllama worker` process and its log, read continuously so its pipe never fills."""

    def __init__(
        self, prefix: list[str], host: str, port: int, nthreads: int, deadline: Deadline, extra: tuple = ()
    ):
        cmd = [
            *prefix,
            sys.executable,
            "-m",
            "engine.cli",
            "worker",
            "--host",
            host,
            "--port",
            str(port),
            "--nthreads",
            str(nthreads),
            *extra,
        ]
        self.proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        while True:
            try:
                line = self.lines.get(timeout=min(deadline.left(), 60))
            except queue.Empty:
                self.kill()
                raise RuntimeError(f"worker {' '.join(cmd)} did not start") from None
            if line.startswith("Listening on "):
                self.address = line.split()[2].removesuffix("...")
                return

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)


def run_root(
    prefix: list[str], workers: list[Worker], args, setting: str, deadline: Deadline, split: str | None = None
) -> Result:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        cmd = [
            *prefix,
            sys.executable,
            "-m",
            "engine.cli",
            "inference",
            "--prompt",
            PROMPT,
            "--steps",
            str(args.steps),
            "--temperature",
            "0",
            "--ignore-eos",
            "--nthreads",
            str(args.nthreads),
            "--buffer-float-type",
            args.buffer_float_type,
            "--max-seq-len",
            "512",
            "--json",
            str(out),
        ]
        if args.model:
            cmd += ["--model", args.model]
        if workers:  # by default the even split of spec 5.8, whose byte counts the table shows
            even = ",".join(["1"] * (1 + len(workers)))
            cmd += ["--workers", *[w.address for w in workers], "--split", split or even]
        r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=deadline.left())
        if r.returncode:
            raise RuntimeError(f"the root failed ({setting}, {1 + len(workers)} nodes): {r.stderr.strip()}")
        j = json.loads(out.read_text())
    n = max(j["decode_tokens"], 1)
    return Result(
        setting,
        j["nodes"],
        j["decode_tokens"],
        j["decode_eval_s"] * 1e3 / n,
        j["decode_sync_s"] * 1e3 / n,
        j["decode_sent_bytes_per_token"],
        j["decode_recv_bytes_per_token"],
        j["decode_tokens_per_s"],
        j["decode_sync_ms_per_exchange"],
    )


def run_setting(
    setting: str, nodes: list[int], args, deadline: Deadline, ns: Namespaces | None
) -> list[Result]:
    """Start max(nodes)-1 workers once (they serve one root after another) and time a root per node count."""
    workers: list[Worker] = []
    results = []
    try:
        for i in range(1, max(nodes)):
            if ns is None:
                workers.append(Worker([], "127.0.0.1", 0, args.nthreads, deadline))
            else:
                workers.append(Worker(ns.exec(i), f"{SUBNET}.{i + 1}", PORT, args.nthreads, deadline))
        for n in nodes:
            res = run_root(ns.exec(0) if ns else [], workers[: n - 1], args, setting, deadline)
            print(format_row(res), flush=True)
            results.append(res)
    finally:
        for w in workers:
            w.kill()
    return results


def run_hetero(args, deadline: Deadline) -> list[Result]:
    """Two nodes on loopback, one thread each, the worker sharing its core with a busy process (so it runs at
    about half speed): the even split against the split by measured speed (`--split auto`)."""
    if shutil.which("taskset") is None or (os.cpu_count() or 1) < 2:
        print("skipped the heterogeneous case: it needs taskset and 2 cores", file=sys.stderr)
        return []
    one = argparse.Namespace(**{**vars(args), "nthreads": 1})
    busy = subprocess.Popen(["taskset", "-c", "1", sys.executable, "-c", "while True: pass"])
    try:
        w = Worker(["taskset", "-c", "1"], "127.0.0.1", 0, 1, deadline)  # measures its speed beside `busy`
        try:
            rows = []
            for setting, split in (("hetero even", "1,1"), ("hetero weighted", "auto")):
                rows.append(run_root(["taskset", "-c", "0"], [w], one, setting, deadline, split))
                print(format_row(rows[-1]), flush=True)
            return rows
        finally:
            w.kill()
    finally:
        busy.kill()
        busy.wait(timeout=30)


def run_startup(args, deadline: Deadline, ns: Namespaces | None) -> list[dict]:
    """Seconds from starting a 2-node root to its first token, with a cold and then a warm worker slice
    cache, and the weight bytes the root sent each time."""
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        prefix, host, port = (ns.exec(1), f"{SUBNET}.2", PORT) if ns else ([], "127.0.0.1", 0)
        w = Worker(prefix, host, port, args.nthreads, deadline, ("--cache-dir", cache))
        try:
            for label in ("cold cache", "warm cache"):
                cmd = [*(ns.exec(0) if ns else []), sys.executable, "-m", "engine.cli", "inference"]
                cmd += ["--prompt", "Hi", "--steps", "1", "--temperature", "0"]
                cmd += ["--nthreads", str(args.nthreads)]
                cmd += ["--buffer-float-type", args.buffer_float_type, "--max-seq-len", "512"]
                cmd += (["--model", args.model] if args.model else []) + ["--workers", w.address]
                cmd += ["--split", "1,1"]  # the same slice both times, whatever the calibration says
                t0 = time.monotonic()
                r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=deadline.left())
                seconds = time.monotonic() - t0
                if r.returncode:
                    raise RuntimeError(f"the root failed ({label}): {r.stderr.strip()}")
                sent = re.search(r"([\d.]+) MB of weights sent in", r.stdout)
                mb = float(sent.group(1))
                rows.append({"case": label, "first_token_s": seconds, "weights_sent_mb": mb})
                print(f"| start-up, {label} | {seconds:.2f} s to the first token | {sent.group(1)} MB sent |")
        finally:
            w.kill()
    return rows


HEADER = (
    "| setting | nodes | eval ms/tok | sync ms/tok | ms/exchange | sent kB/tok | recv kB/tok | tokens/s |"
)


def format_row(r: Result) -> str:
    return (
        f"| {r.setting} | {r.nodes} | {r.eval_ms:.2f} | {r.sync_ms:.2f} | {r.sync_ms_per_exchange:.3f} | "
        f"{r.sent_bytes / 1024:.1f} | "
        f"{r.recv_bytes / 1024:.1f} | {r.tokens_per_s:.1f} |"
    )


def namespaces_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "network namespaces need the `ip` command (iproute2)"
    return None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", default="1,2,3", help="node counts to time (default 1,2,3)")
    ap.add_argument("--steps", type=int, default=48, help="positions per run, prompt included")
    ap.add_argument("--model", help="model file (default: the embedded SmolLM2-135M)")
    ap.add_argument("--buffer-float-type", default="q80", choices=("f32", "q80"))
    ap.add_argument("--nthreads", type=int, default=1, help="threads per node")
    ap.add_argument("--rate", help="shape every namespace link to this rate, e.g. 1gbit")
    ap.add_argument("--delay", help="add this one-way delay per link end, e.g. 0.1ms (needs netem)")
    ap.add_argument("--no-loopback", action="store_true", help="only the namespace runs")
    ap.add_argument("--short", action="store_true", help="CI: 2 nodes in two namespaces, 6 steps, no shaping")
    ap.add_argument("--hetero", action="store_true", help="also: a half-speed worker, even vs weighted split")
    ap.add_argument("--startup", action="store_true", help="also: time to a first token, cold vs warm cache")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--timeout", type=float, default=900, help="bound on the whole run in seconds")
    args = ap.parse_args()
    if args.short:
        args.nodes, args.steps, args.no_loopback, args.rate, args.delay = "2", 6, True, None, None
    nodes = sorted({int(n) for n in args.nodes.split(",")})
    deadline = Deadline(args.timeout)
    print(HEADER + "\n|---|---|---|---|---|---|---|---|", flush=True)
    results: list[Result] = []
    startup: list[dict] = []
    try:
        if not args.no_loopback:
            results += run_setting("loopback", nodes, args, deadline, None)
        why_not = namespaces_unavailable()
        if why_not:
            print(f"skipped the namespace runs: {why_not}", file=sys.stderr)
            if args.short:
                return 3
        else:
            shape = "".join(f" {x}" for x in (args.rate, args.delay) if x)
            with Namespaces(max(max(nodes), 2), args.rate, args.delay) as ns:
                print(f"namespaces {ns.names[0]}..{ns.names[-1]}", file=sys.stderr)
                results += run_setting("netns" + shape, nodes, args, deadline, ns)
                if args.startup:
                    startup = run_startup(args, deadline, ns)
        if args.hetero:
            results += run_hetero(args, deadline)
        if args.startup and why_not:
            startup = run_startup(args, deadline, None)
    except (RuntimeError, TimeoutError, subprocess.TimeoutExpired) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.json:
        rows = [asdict(r) for r in results] + [{"setting": "startup", **row} for row in startup]
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
