"""The one prepared check for a machine with a GPU (issue 15), run by tools/gpu_check.sh: the Vulkan tests,
the shader benchmark at Llama 3.1 8B's shapes (both matmul orientations, attention up to 4096 positions),
and decode/prefill of a 2-layer random model of the 8B's shape on both backends. Writes gpu_check.json and
gpu_check.png (plus the test log and the shader benchmark's JSON and PNG) into OUT. No network, no model
download: the model is written here. On lavapipe it runs end to end too (its numbers are CPU emulation).

    python tools/gpu_check.py OUT [--budget SECONDS] [--steps 64]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_peer import write_random_m  # noqa: E402

from engine.config import ModelConfig  # noqa: E402
from engine.errors import DllamaError  # noqa: E402
from engine.loader import make_backend  # noqa: E402
from engine.model_file import open_model  # noqa: E402
from engine.runner import Runner  # noqa: E402
from shaders.backend import VulkanProgram  # noqa: E402
from shaders.devices import list_devices, pick_device  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHAPE_8B_2L = ModelConfig("llama", 4096, 14336, 2, 32, 8, 128, 128256, 8192, rope_theta=500000.0)
EMULATED_VOCAB = 32768  # lavapipe's 2 GiB heap cannot hold the .m format's float32 embedding of 128k rows
PROMPT = 64  # prefill tokens


def _run(cmd: list[str], log: Path, limit: float) -> dict:
    """A subprocess with its output in `log`, stopped after `limit` seconds: return code and wall time."""
    t0 = time.monotonic()
    with log.open("w") as f:
        try:
            rc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, timeout=limit).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    return {"rc": rc, "seconds": round(time.monotonic() - t0, 1), "log": log.name}


def vulkan_tests(out: Path, limit: float) -> dict:
    """tests/shaders (what needs a Vulkan device; not the packaging test, which builds a wheel with
    setuptools), with the last line of pytest's summary."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/shaders"]
    res = _run([*cmd, "--deselect", "tests/shaders/test_wheel.py"], out / "tests.log", limit)
    lines = [ln for ln in (out / "tests.log").read_text(errors="replace").splitlines() if ln.strip()]
    res["summary"] = lines[-1] if lines else ""
    return res


def shader_bench(out: Path, limit: float) -> dict:
    """tools/shader_bench.py at SmolLM2's and Llama 3.1 8B's shapes; its report's JSON and bar chart."""
    cmd = [sys.executable, "tools/shader_bench.py", "--no-progress", "--json", str(out / "shader_bench.json")]
    res = _run([*cmd, "--plot", str(out / "shader_bench.png")], out / "shader_bench.log", limit)
    if (out / "shader_bench.json").is_file():
        report = json.loads((out / "shader_bench.json").read_text())
        res["copy_gbps"] = report.get("copy_gbps")
        res["device"] = report.get("device")
    return res


def decode(model_path: Path, backend_name: str, steps: int) -> dict:
    """Prefill of PROMPT tokens, then `steps` greedy decode steps (token ids, no tokenizer), Q80 buffers."""
    backend = make_backend(backend_name, None)
    r = Runner(open_model(model_path), backend, "q80", max_seq_len=PROMPT + steps + 1, max_batch=PROMPT)
    try:
        prompt = [int(t) for t in np.random.default_rng(1).integers(1, 1000, PROMPT)]
        r.forward(prompt, 0)  # warm-up: compiles and records every sequence once
        t0 = time.perf_counter()
        logits = r.forward(prompt, 0)
        prefill_s = time.perf_counter() - t0
        prog = r.program
        vulkan = isinstance(prog, VulkanProgram)
        submits0 = prog.submits if vulkan else 0
        tokens, t0 = [], time.perf_counter()
        for i in range(steps):
            tokens.append(int(np.argmax(logits)))
            logits = r.forward([tokens[-1]], PROMPT + i)
        decode_s = time.perf_counter() - t0
        per_token = r.weight_bytes_per_token
        counted = {}
        if vulkan:  # what one decode token records and submits, counted
            c = prog.counts(0, len(r.graph.segments), 1)
            counted = {
                "submits_per_token": (prog.submits - submits0) / max(steps, 1),
                "dispatches_per_token": c.dispatches,
                "barriers_per_token": c.barriers,
                "host_read_bytes_per_token": c.host_read_bytes,
                "transfer_bytes_per_token": c.transfer_bytes,
            }
    finally:
        r.close()
    return {
        "backend": backend.description,
        "prefill_tokens_per_s": round(PROMPT / prefill_s, 2),
        "decode_tokens_per_s": round(steps / decode_s, 2),
        "decode_gbps": round(per_token * steps / decode_s / 1e9, 2),
        "weight_bytes_per_token": per_token,
        **counted,
        "tokens": tokens,
    }


def _emulated() -> bool:
    """Whether the Vulkan device is a CPU implementation (lavapipe) or there is none."""
    try:
        return pick_device(list_devices(), None).is_cpu
    except DllamaError:
        return True


def write_png(path: Path, runs: dict[str, dict]) -> None:
    """Decode and prefill tokens/s of each backend, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(runs)
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for ax, key, title in zip(
        axes, ("decode_tokens_per_s", "prefill_tokens_per_s"), ("decode", "prefill"), strict=True
    ):
        ax.bar(names, [runs[n].get(key, 0) for n in names], color=["#888", "#2a7"][: len(names)])
        ax.set_title(f"{title} tok/s, 2-layer Llama-3.1-8B shape, Q40 / Q80 buffers", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="folder for the results (created)")
    ap.add_argument("--budget", type=float, default=480, help="seconds for the whole check (default 480)")
    ap.add_argument("--steps", type=int, default=64, help="decode steps per backend")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    end = time.monotonic() + args.budget
    report: dict = {"python": platform.python_version(), "numpy": np.__version__}
    report["tests"] = vulkan_tests(args.out, 0.35 * (end - time.monotonic()))
    report["shader_bench"] = shader_bench(args.out, 0.45 * (end - time.monotonic()))
    runs: dict[str, dict] = {}
    shape = dataclasses.replace(SHAPE_8B_2L, vocab_size=EMULATED_VOCAB) if _emulated() else SHAPE_8B_2L
    report["model"] = {"shape": "Llama-3.1-8B, 2 layers", "vocab": shape.vocab_size, "weights": "q40"}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "llama8b-2layers-q40.m"
        write_random_m(path, shape)
        for name in ("cpu", "vulkan"):
            try:
                runs[name] = decode(path, name, args.steps)
            except DllamaError as e:
                runs[name] = {"error": str(e)}
    if all("tokens" in r for r in runs.values()):
        a, b = (runs[n]["tokens"] for n in ("cpu", "vulkan"))
        report["same_greedy_prefix"] = next(
            (i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a)
        )
    report["decode"] = runs
    report["seconds"] = round(args.budget - (end - time.monotonic()), 1)
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=1) + "\n")
    write_png(args.out / "gpu_check.png", runs)
    for name, r in runs.items():
        print(f"{name}: {r}")
    print(f"tests: {report['tests']}; shader bench: rc {report['shader_bench']['rc']}; {report['seconds']} s")
    return 0 if report["tests"]["rc"] == 0 and all("tokens" in r for r in runs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
