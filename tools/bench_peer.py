"""dllama side by side with the C++ distributed-llama (the peer) on the same .m and .t files.

Runs both programs alternately, `--repeat` times each, on the configurations of issue 12: one node with 1 and
2 threads (decode of 128 tokens; prefill of 5- and 60-token prompts) on SmolLM2-135M Q40 and on a random Q40
model of Llama-3.2-1B's shape that this tool writes (cached beside dllama's models); 3 nodes on loopback for
SmolLM2 and 2 for the 1B shape (1 thread each); 2-thread decode of SmolLM2 with one busy process on the cores.
Prints a table of medians and ratios (dllama / peer), the two-thread streaming read bandwidth and the load
average, and writes --json and a PNG bar chart.

Figures: dllama's decode tokens/s are end to end (sampling, detokenising, network), its prefill tokens/s are
those of the forward passes (the peer's are: its "Evaluation" runs the prompt less its last token, and its
"Prediction tokens/s" leaves sampling out); the peer's `--steps` counts prompt and generated positions.
Greedy decoding (temperature 0) on both sides, q80 buffers.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from engine.atomic_file import atomic_write
from engine.catalog import cache_dir, resolve_model
from engine.config import ModelConfig
from engine.mfile import KEY_ID, M_MAGIC, stream_plan
from engine.tfile import TFile, tfile_from_gguf, write_tfile

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PEER = REPO.parent / "shared" / "peers" / "distributed-llama" / "dllama"
TEXT = (
    "Distributed inference splits every weight matrix of a language model across several machines, so that "
    "each one reads only its share of the weights for every generated token. The root node holds the "
    "embedding and the classifier, the workers hold slices of each layer, and after every layer the nodes "
    "exchange their partial results over the network before the next layer can start its work."
)
DECODE_STEPS = 128
SHAPE_1B = ModelConfig("llama", 2048, 8192, 16, 32, 8, 64, 32768, 4096, rope_theta=500000.0)
SHAPE_SHORT = ModelConfig("llama", 128, 256, 2, 4, 2, 32, 32768, 4096, rope_theta=500000.0)
Q40_BLOCK = np.dtype([("d", "<f2"), ("qs", "u1", 16)])  # GGML Q4_0: a half-float scale, 32 nibbles


@dataclass
class Case:
    """One configuration: a model, what is timed (decode, prefill5, prefill60), threads and nodes."""

    model: str
    kind: str
    threads: int = 1
    nodes: int = 1
    busy: bool = False  # one other busy process on the cores

    @property
    def label(self) -> str:
        where = f"{self.nodes} nodes" if self.nodes > 1 else f"{self.threads} thr"
        return f"{self.model} {self.kind} {where}" + (" +busy" if self.busy else "")


@dataclass
class Run:
    """The figures of one run of one program: tokens/s (and dllama's forward-only and sync figures)."""

    tokens_per_s: float
    forward_tokens_per_s: float | None = None
    sync_ms_per_token: float | None = None
    sync_ms_per_exchange: float | None = None
    weight_bytes_per_token: int | None = None
    prompt_tokens: int | None = None
    exchanges_per_token: int | None = None  # dllama's all-slices steps per decode pass


@dataclass
class Row:
    case: Case
    dllama: list[Run] = field(default_factory=list)
    peer: list[Run] = field(default_factory=list)


def full_cases() -> list[Case]:
    cases = [
        Case(m, kind, threads)
        for m in ("smollm2", "1b")
        for threads in (1, 2)
        for kind in ("decode", "prefill5", "prefill60")
    ]
    return cases + [
        Case("smollm2", "decode", 1, 3),
        Case("1b", "decode", 1, 2),
        Case("smollm2", "decode", 2, busy=True),
    ]


def short_cases() -> list[Case]:
    return [Case("tiny", "decode"), Case("tiny", "prefill5"), Case("tiny", "decode", nodes=2)]


# ---- model files ----
def smollm2_files(root: Path) -> tuple[Path, Path]:
    """SmolLM2-135M as a Q40 .m and its .t, converted once from the embedded GGUF."""
    m, t = root / "smollm2-135m-q40.m", root / "smollm2-135m-q40.t"
    if not (m.exists() and t.exists()):
        print(f"converting SmolLM2-135M to {m} ...", file=sys.stderr)
        cmd = [sys.executable, "-m", "engine.cli", "convert", "--model", "smollm2", "--output", str(m)]
        subprocess.run(
            [*cmd, "--weights-float-type", "q40", "--tokenizer-output", str(t)], cwd=REPO, check=True
        )
    return m, t


def random_files(root: Path, name: str, cfg: ModelConfig) -> tuple[Path, Path]:
    """A random Q40 .m of shape `cfg` and a .t of its vocabulary size, written once."""
    m, t = root / f"{name}-random-q40.m", root / f"{name}-random-q40.t"
    if not t.exists():
        write_tfile(t, truncated_smollm2_tokenizer(cfg.vocab_size))
    if not m.exists():
        print(f"writing the random {name} model {m} ...", file=sys.stderr)
        write_random_m(m, cfg)
    return m, t


def truncated_smollm2_tokenizer(vocab_size: int) -> TFile:
    """SmolLM2's tokenizer cut to `vocab_size` ids: its first regular tokens (BPE merges stay valid: a merged
    token only forms when it is in the vocabulary) and all its special tokens after them."""
    from engine.model_file import open_model

    tf, _ = tfile_from_gguf(open_model(resolve_model("smollm2")).metadata)
    special = len(tf.vocab) - tf.bos_id
    keep = vocab_size - special
    return TFile(
        tf.vocab[:keep] + tf.vocab[tf.bos_id :],
        tf.scores[:keep] + tf.scores[tf.bos_id :],
        keep,
        [e - tf.bos_id + keep for e in tf.eos_ids],
        tf.add_bos,
        tf.chat_template,
    )


def write_random_m(path: Path, cfg: ModelConfig, seed: int = 0) -> None:
    """A Llama .m with random Q40 matrices (scales ~0.005: activations stay of order 1), random f32
    embeddings and unit norms, in the converter's tensor order; written a few MB at a time, atomically."""
    rng = np.random.default_rng(seed)
    pairs = {
        "version": 0, "arch_type": 0xABCD00, "hidden_act": 1, "dim": cfg.dim, "hidden_dim": cfg.hidden_dim,
        "n_layers": cfg.n_layers, "n_heads": cfg.n_heads, "n_kv_heads": cfg.n_kv_heads,
        "weights_float_type": 2, "max_seq_len": cfg.context_len, "vocab_size": cfg.vocab_size,
        "n_experts": 0, "n_active_experts": 0, "rope_theta": int(cfg.rope_theta), "head_dim": cfg.head_dim,
        "norm_epsilon": 5,
    }  # fmt: skip
    with atomic_write(path) as f:
        f.write(struct.pack("<iI", M_MAGIC, 8 + 8 * len(pairs)))
        f.write(np.array([(KEY_ID[k], v) for k, v in pairs.items()], dtype="<i4").tobytes())
        for group in stream_plan(cfg, "q40"):
            for name, dtype, shape in group:
                rows, cols = shape if len(shape) == 2 else (1, shape[0])
                step = max(1, (1 << 22) // cols)
                for start in range(0, rows, step):
                    n = min(step, rows - start)
                    if dtype == "f32" and name.endswith("norm.weight"):
                        f.write(np.ones(n * cols, "<f4").tobytes())
                    elif dtype == "f32":
                        f.write(rng.standard_normal(n * cols, np.float32).tobytes())
                    else:
                        blocks = np.empty(n * cols // 32, Q40_BLOCK)
                        blocks["d"] = rng.uniform(0.004, 0.006, len(blocks))
                        blocks["qs"] = rng.integers(0, 256, (len(blocks), 16), np.uint8)
                        f.write(blocks.tobytes())


def prompt_of(tokens: int, t_path: Path) -> str:
    """The shortest prefix of TEXT that the .t tokenizer encodes to exactly `tokens` tokens."""
    from engine.tokenizer import load_tokenizer

    tok = load_tokenizer(t_path)
    for end in range(1, len(TEXT) + 1):
        if len(tok.encode(TEXT[:end])) == tokens and not TEXT[end - 1].isspace():
            return TEXT[:end]
    raise RuntimeError(f"no prefix of the benchmark text is {tokens} tokens long with {t_path}")


# ---- processes ----
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Worker:
    """A worker process (dllama's or the peer's) listening on loopback, its output drained continuously."""

    def __init__(self, cmd: list[str], timeout: float):
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env()
        )
        ready = threading.Event()
        self.address = ""

        def read() -> None:
            for line in self.proc.stdout:
                if line.startswith("Listening on ") and not ready.is_set():
                    self.address = line.split()[2].removesuffix("...")
                    ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(timeout):
            self.kill()
            raise RuntimeError(f"worker {' '.join(cmd)} did not start within {timeout:.0f} s")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONUNBUFFERED="1")


def start_workers(program: str, args, case: Case) -> list[Worker]:
    workers: list[Worker] = []
    try:
        for _ in range(case.nodes - 1):
            if program == "dllama":
                cmd = [sys.executable, "-m", "engine.cli", "worker", "--host", "127.0.0.1", "--port", "0"]
                workers.append(Worker([*cmd, "--nthreads", str(case.threads)], args.timeout))
            else:
                port = free_port()
                cmd = ["stdbuf", "-oL", str(args.peer), "worker", "--port", str(port), "--net-turbo", "0"]
                w = Worker([*cmd, "--nthreads", str(case.threads)], args.timeout)
                w.address = f"127.0.0.1:{port}"
                workers.append(w)
    except BaseException:
        for w in workers:
            w.kill()
        raise
    return workers


def run_dllama(
    case: Case, files: tuple[Path, Path], prompt: str, steps: int, workers: list[str], args
) -> Run:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        cmd = [sys.executable, "-m", "engine.cli", "inference", "--model", str(files[0]), "--tokenizer"]
        cmd += [str(files[1]), "--prompt", prompt, "--steps", str(steps), "--temperature", "0", "--seed", "1"]
        cmd += ["--ignore-eos", "--nthreads", str(case.threads), "--buffer-float-type", "q80"]
        cmd += ["--max-seq-len", "1024", "--json", str(out)]
        if workers:  # the peer's even split, so both run the same slices
            cmd += ["--workers", *workers, "--split", ",".join(["1"] * (1 + len(workers)))]
        r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=args.timeout, env=_env())
        if r.returncode:
            raise RuntimeError(f"dllama failed on {case.label}: {r.stderr.strip()[-500:]}")
        j = json.loads(out.read_text())
    n = max(j["decode_tokens"], 1)
    if case.kind == "decode":
        return Run(
            j["decode_tokens_per_s"],
            j["decode_forward_tokens_per_s"],
            j["decode_sync_s"] * 1e3 / n,
            j.get("decode_sync_ms_per_exchange") if case.nodes > 1 else None,
            j["weight_bytes_per_token"],
            j["prefill_tokens"],
            j.get("decode_exchanges_per_token"),
        )
    return Run(
        j["prefill_forward_tokens_per_s"],
        j["prefill_forward_tokens_per_s"],
        prompt_tokens=j["prefill_tokens"],
    )


def run_peer(
    case: Case, files: tuple[Path, Path], prompt: str, n_prompt: int, steps: int, workers, args
) -> Run:
    """The peer's figures from its printout; its --steps counts the prompt too."""
    cmd = [str(args.peer), "inference", "--model", str(files[0]), "--tokenizer", str(files[1]), "--prompt"]
    cmd += [
        prompt,
        "--steps",
        str(n_prompt - 1 + steps),
        "--nthreads",
        str(case.threads),
        "--temperature",
        "0",
    ]
    cmd += ["--seed", "1", "--buffer-float-type", "q80", "--max-seq-len", "1024", "--net-turbo", "0"]
    cmd += ["--workers", *workers] if workers else []
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    if r.returncode:
        raise RuntimeError(f"the peer failed on {case.label}: {(r.stdout + r.stderr).strip()[-500:]}")
    return parse_peer(r.stdout, case.kind)


def parse_peer(out: str, kind: str) -> Run:
    """Evaluation / Prediction tokens/s and the mean Sync ms of the Pred lines of the peer's printout."""
    section = "Prediction" if kind == "decode" else "Evaluation"
    m = re.search(section + r"\n(?:.*\n)*?\s*tokens/s: ([\d.]+)", out)
    n = re.search(r"Evaluation\n(?:.*\n)*?\s*nTokens: (\d+)", out)
    if not m or not n:
        raise RuntimeError(f"cannot read the peer's {section} tokens/s in its output: {out[-300:]}")
    syncs = [float(s) for s in re.findall(r"Pred\s+\d+ ms Sync\s+(\d+) ms", out)]
    return Run(
        float(m.group(1)),
        sync_ms_per_token=statistics.mean(syncs) if syncs else None,
        prompt_tokens=int(n[1]),
    )


def busy_process() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def run_case(case: Case, program: str, files, prompts: dict[int, str], args) -> Run:
    n_prompt = 5 if case.kind != "prefill60" else 60
    steps = args.steps if case.kind == "decode" else 1
    busy = busy_process() if case.busy else None
    workers = start_workers(program, args, case)
    try:
        addresses = [w.address for w in workers]
        if program == "dllama":
            return run_dllama(case, files, prompts[n_prompt], steps, addresses, args)
        return run_peer(case, files, prompts[n_prompt], n_prompt, steps, addresses, args)
    finally:
        for w in workers:
            w.kill()
        if busy is not None:
            busy.kill()
            busy.wait()


def streaming_gbps(threads: int = 2, mib: int = 512, repeats: int = 5) -> float:
    """`threads` numpy threads summing their share of a float32 array: the best of `repeats`, in GB/s."""
    a = np.ones(mib << 18, dtype=np.float32)
    parts = np.array_split(a, threads)
    best = float("inf")
    for _ in range(repeats):
        ts = [threading.Thread(target=p.sum) for p in parts]
        t0 = time.perf_counter()
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        best = min(best, time.perf_counter() - t0)
    return a.nbytes / best / 1e9


# ---- report ----
def median(runs: list[Run], attr: str) -> float | None:
    vals = [getattr(r, attr) for r in runs if getattr(r, attr) is not None]
    return statistics.median(vals) if vals else None


def summary(row: Row, stream: float) -> dict:
    ours, peer = median(row.dllama, "tokens_per_s"), median(row.peer, "tokens_per_s")
    s = {
        "case": row.case.label,
        **asdict(row.case),
        "dllama_tokens_per_s": ours,
        "dllama_forward_tokens_per_s": median(row.dllama, "forward_tokens_per_s"),
        "peer_tokens_per_s": peer,
        "ratio": ours / peer if ours and peer else None,
        "dllama_sync_ms_per_token": median(row.dllama, "sync_ms_per_token"),
        "dllama_sync_ms_per_exchange": median(row.dllama, "sync_ms_per_exchange"),
        "peer_sync_ms_per_token": median(row.peer, "sync_ms_per_token"),
        "peer_sync_ms_per_exchange": None,
        "dllama_runs": [r.tokens_per_s for r in row.dllama],
        "peer_runs": [r.tokens_per_s for r in row.peer],
    }
    exchanges = median(row.dllama, "exchanges_per_token")
    if row.case.nodes > 1 and exchanges and s["peer_sync_ms_per_token"] is not None:
        s["peer_sync_ms_per_exchange"] = s["peer_sync_ms_per_token"] / exchanges  # the same steps per token
    wb, fwd = median(row.dllama, "weight_bytes_per_token"), s["dllama_forward_tokens_per_s"]
    if row.case.kind == "decode" and wb and fwd and row.case.nodes == 1:
        s["dllama_gbytes_per_s"] = wb * fwd / 1e9
        s["bandwidth_fraction"] = s["dllama_gbytes_per_s"] / stream
    return s


def _fmt(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


HEADER = (
    "| case | dllama tok/s | dllama fwd | peer tok/s | ratio | sync ms/tok dllama / peer | GB/s (share) |"
)


def print_table(rows: list[dict]) -> None:
    print(HEADER)
    print("|---|---|---|---|---|---|---|")
    for s in rows:
        sync = "-"
        if s["nodes"] > 1:
            sync = (
                f"{_fmt(s['dllama_sync_ms_per_token'], '.2f')} / {_fmt(s['peer_sync_ms_per_token'], '.2f')}"
            )
        if s["dllama_sync_ms_per_exchange"] is not None:
            each = f"{s['dllama_sync_ms_per_exchange']:.3f} / {_fmt(s['peer_sync_ms_per_exchange'], '.3f')}"
            sync += f" ({each} per exchange)"
        bw = (
            f"{s['dllama_gbytes_per_s']:.2f} ({s['bandwidth_fraction']:.2f})"
            if "bandwidth_fraction" in s
            else "-"
        )
        print(
            f"| {s['case']} | {_fmt(s['dllama_tokens_per_s'])} | {_fmt(s['dllama_forward_tokens_per_s'])} | "
            f"{_fmt(s['peer_tokens_per_s'])} | {_fmt(s['ratio'], '.2f')} | {sync} | {bw} |"
        )


def add_contention(table: list[dict]) -> None:
    """A busy case's speed as a share of the same program's quiet run of that configuration."""
    for s in table:
        quiet = next(
            (q for q in table if not q["busy"] and q["case"] == s["case"].removesuffix(" +busy")), None
        )
        if s["busy"] and quiet:
            for who in ("dllama", "peer"):
                busy, calm = s[f"{who}_tokens_per_s"], quiet[f"{who}_tokens_per_s"]
                s[f"{who}_busy_share"] = busy / calm if busy and calm else None


def print_goals(table: list[dict], stream: float) -> None:
    """The figures the ratios above leave out: bandwidth share, contention, per-exchange overhead."""
    for s in table:
        if not s["busy"] and "bandwidth_fraction" in s:
            print(
                f"{s['case']}: {s['dllama_gbytes_per_s']:.2f} GB/s of weights, "
                f"{s['bandwidth_fraction']:.2f} of the {stream:.2f} GB/s two-thread streaming read"
            )
        if s["busy"] and "dllama_busy_share" in s:
            print(
                f"{s['case']}: dllama keeps {_fmt(s['dllama_busy_share'], '.2f')} of its quiet speed, "
                f"the peer {_fmt(s['peer_busy_share'], '.2f')}"
            )
        if s["nodes"] > 1:
            print(
                f"{s['case']}: sync per network step: dllama "
                f"{_fmt(s['dllama_sync_ms_per_exchange'], '.3f')} ms, peer "
                f"{_fmt(s['peer_sync_ms_per_exchange'], '.3f')} ms (its sync ms/token over the same steps)"
            )


def write_png(path: Path, rows: list[dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(rows)), 5))
    ours = [s["dllama_tokens_per_s"] or 0 for s in rows]
    peer = [s["peer_tokens_per_s"] or 0 for s in rows]
    ax.bar(x - 0.2, ours, 0.4, label="dllama (decode end to end, prefill forward)")
    ax.bar(x + 0.2, peer, 0.4, label="C++ distributed-llama")
    for i, s in enumerate(rows):
        if s["ratio"]:
            ax.text(i, max(ours[i], peer[i]), f"{s['ratio']:.2f}x", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, [s["case"] for s in rows], rotation=45, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("tokens/s (median)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--peer", type=Path, default=DEFAULT_PEER, help=f"the peer's binary (default {DEFAULT_PEER})"
    )
    ap.add_argument("--repeat", type=int, default=3, help="runs of each program per configuration")
    ap.add_argument("--steps", type=int, default=DECODE_STEPS, help="generated tokens of a decode run")
    ap.add_argument("--only", help="run only the cases whose label contains this text")
    ap.add_argument("--cache", type=Path, help="where the model files go (default: dllama's cache/bench)")
    ap.add_argument("--json", type=Path, help="write the results to this file")
    ap.add_argument(
        "--png", type=Path, default=Path("bench_peer.png"), help="bar chart (default bench_peer.png)"
    )
    ap.add_argument("--timeout", type=float, default=600, help="bound on each program run in seconds")
    ap.add_argument("--short", action="store_true", help="a quick check: a tiny random model, 8 steps, 1 run")
    args = ap.parse_args()
    if not args.peer.is_file() or not os.access(args.peer, os.X_OK):
        print(
            f"error: the peer binary {args.peer} is missing (or not executable): build distributed-llama "
            "(make dllama) and pass --peer PATH",
            file=sys.stderr,
        )
        return 2
    cases = short_cases() if args.short else full_cases()
    if args.short:
        args.repeat, args.steps = 1, 8
    if args.only:
        cases = [c for c in cases if args.only in c.label]
    root = args.cache or cache_dir() / "bench"
    root.mkdir(parents=True, exist_ok=True)
    files = {}
    for name in sorted({c.model for c in cases}):
        if name == "smollm2":
            files[name] = smollm2_files(root)
        else:
            files[name] = random_files(
                root,
                "llama-3.2-1b-shape" if name == "1b" else name,
                SHAPE_1B if name == "1b" else SHAPE_SHORT,
            )
    prompts = {name: {n: prompt_of(n, t) for n in (5, 60)} for name, (_, t) in files.items()}
    load_start = os.getloadavg()
    stream = streaming_gbps(2)
    print(
        f"streaming read, 2 threads: {stream:.2f} GB/s; load average {load_start[0]:.2f} {load_start[1]:.2f}"
    )
    rows = [Row(c) for c in cases]
    try:
        for rep in range(args.repeat):
            for row in rows:
                order = ("dllama", "peer") if rep % 2 == 0 else ("peer", "dllama")
                for program in order:
                    run = run_case(row.case, program, files[row.case.model], prompts[row.case.model], args)
                    (row.dllama if program == "dllama" else row.peer).append(run)
                    print(
                        f"  {row.case.label}: {program} {run.tokens_per_s:.1f} tok/s",
                        file=sys.stderr,
                        flush=True,
                    )
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    load_end = os.getloadavg()
    table = [summary(r, stream) for r in rows]
    add_contention(table)
    print_table(table)
    print_goals(table, stream)
    print(f"load average at the start {load_start[0]:.2f}, at the end {load_end[0]:.2f} (1 minute)")
    result = {
        "peer": str(args.peer),
        "repeat": args.repeat,
        "decode_steps": args.steps,
        "stream_gbytes_per_s_2_threads": stream,
        "load_average": {"start": list(load_start), "end": list(load_end)},
        "results": table,
    }
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    loads = f"load {load_start[0]:.1f} to {load_end[0]:.1f}"
    title = f"dllama vs distributed-llama, medians of {args.repeat} runs, {loads}"
    write_png(args.png, table, title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
