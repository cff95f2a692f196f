"""The `dllama` command line: inference, chat, perplexity, convert."""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, NoReturn

import numpy as np
import typer

from engine.atomic_file import atomic_write, check_output
from engine.errors import DllamaError
from engine.files import open_regular
from net.protocol import MAX_NET_TIMEOUT, NET_TIMEOUT

TEXT_LIMIT = 16 << 20  # bytes of a perplexity --file: far more text than any context holds

app = typer.Typer(
    add_completion=False,
    invoke_without_command=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="Tensor-parallel LLM inference on CPU and Vulkan nodes.",
)


# ---- parse-time checks: a bad value is refused with the flag's name and its accepted range ----
def _in_range(ok: Callable[[float], bool], accepted: str) -> Callable[[float | None], float | None]:
    """A callback refusing a non-finite number or one that fails `ok`, naming the accepted range."""

    def check(value: float | None) -> float | None:
        if value is not None and not ((isinstance(value, int) or math.isfinite(value)) and ok(value)):
            raise typer.BadParameter(f"{value} is out of range: {accepted}")
        return value

    return check


def _check_threads(value: int | None) -> int | None:
    cores = os.cpu_count() or 1
    return _in_range(lambda n: 1 <= n <= cores, f"give 1 to {cores} (the cores of this machine)")(value)


def _non_empty(what: str) -> Callable[[str | None], str | None]:
    def check(value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise typer.BadParameter(f"the value is empty: give {what}")
        return value

    return check


def _check_output(value: str | None) -> str | None:
    """An output file: a regular file (or a new one) in an existing folder, checked before any work."""
    if value is not None:
        try:
            check_output(value)
        except DllamaError as e:
            raise typer.BadParameter(str(e)) from None
    return value


def as_text(value: str | None) -> str | None:
    """Command-line text with invalid UTF-8 bytes (surrogate escapes) as U+FFFD, as llama.cpp reads them."""
    if value is None:
        return None
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _worker_list(values: list[str] | None) -> list[str]:
    """Every address of every --workers value (a value may hold several, comma or space separated)."""
    return [a for v in values or [] for a in v.replace(",", " ").split()]


def _check_workers(values: list[str] | None) -> list[str] | None:
    """The --workers addresses, each HOST:PORT and none twice; an empty value is refused."""
    from net.transport import parse_address

    if values is None:
        return None
    if any(not v.replace(",", " ").split() for v in values):
        raise typer.BadParameter("an empty worker address: give HOST:PORT, e.g. 10.0.0.2:9990")
    out: list[str] = []
    for a in _worker_list(values):
        try:
            if not a.isascii():
                raise DllamaError(f"bad worker address {a!r}: use HOST:PORT, e.g. 10.0.0.2:9990")
            parse_address(a)
        except DllamaError as e:
            raise typer.BadParameter(str(e)) from None
        if a in out:
            raise typer.BadParameter(f"worker {a} is given twice")
        out.append(a)
    return out


def _check_template(value: str | None) -> str | None:
    from engine.chat_template import BUILTIN_TEMPLATES

    if value is not None and value not in BUILTIN_TEMPLATES:
        raise typer.BadParameter(f"unknown template {value!r}: choose one of {', '.join(BUILTIN_TEMPLATES)}")
    return value


PORT_RANGE = _in_range(lambda n: 0 <= n <= 65535, "give 0 to 65535 (0: any free port)")

# ---- options shared by the commands that load a model ----
Model = Annotated[
    str | None,
    typer.Option(
        "--model",
        callback=_non_empty("a GGUF or .m file, or a model name"),
        help="GGUF or .m file, a Hugging Face folder, a catalogue name (`dllama launch` lists them; default "
        "smollm2, embedded), or hf://OWNER/REPO/FILE.gguf or an https:// URL (downloaded once, cached)",
    ),
]
TokenizerOpt = Annotated[
    str | None,
    typer.Option(
        "--tokenizer",
        callback=_non_empty("a .t or GGUF file"),
        help=".t or GGUF tokenizer (a GGUF model has its own)",
    ),
]
BufType = Annotated[str, typer.Option("--buffer-float-type", help="activation/sync numbers: f32 or q80")]
KvType = Annotated[
    str, typer.Option("--kv-cache-type", help="KV-cache numbers: f32 or f16 (half the memory and reads)")
]
Threads = Annotated[
    int | None,
    typer.Option(
        "--nthreads", callback=_check_threads, help="CPU threads, 1 to the cores (default: all cores)"
    ),
]
SeqLen = Annotated[
    int | None,
    typer.Option(
        "--max-seq-len",
        callback=_in_range(lambda n: n >= 1, "give at least 1 (the model's context caps it)"),
        help="context to allocate, >= 1 (default min(model, 4096))",
    ),
]
Temp = Annotated[
    float,
    typer.Option(
        "--temperature",
        callback=_in_range(lambda t: t >= 0, "give a finite number of at least 0 (0: greedy)"),
        help="a finite number >= 0; 0 = greedy",
    ),
]
TopP = Annotated[
    float,
    typer.Option(
        "--topp",
        callback=_in_range(
            lambda p: 0 <= p <= 1,
            "give a number from 0 to 1 (0 or 1: no nucleus cut, as in distributed-llama)",
        ),
        help="nucleus sampling mass, 0 to 1 (0 or 1: sample the whole distribution)",
    ),
]
SEED_RANGE = _in_range(lambda n: 0 <= n < 2**64, "give an integer from 0 to 2^64-1")
Seed = Annotated[
    int | None, typer.Option("--seed", callback=SEED_RANGE, help="random seed, 0 to 2^64-1 (default: time)")
]
BackendOpt = Annotated[
    str | None, typer.Option("--backend", help="cpu, vulkan or auto (also accepted before the command)")
]
JsonOut = Annotated[
    str | None,
    typer.Option(
        "--json", callback=_check_output, help="write the results as one JSON object to FILE (a regular file)"
    ),
]
Workers = Annotated[
    list[str] | None,
    typer.Option(
        "--workers",
        callback=_check_workers,
        help="worker HOST:PORT addresses: several after one flag (`--workers a:9990 b:9990`), the flag "
        "repeated, or comma-separated; this node becomes the root of the cluster",
    ),
]


def _check_split(value: str | None) -> list[float] | str | None:
    """--split auto, or 3,1,1: one positive finite weight per node, root first."""
    if value is None or value == "auto":
        return value
    try:
        weights = [float(v) for v in value.split(",")]
    except ValueError:
        weights = []
    if not weights or not all(math.isfinite(w) and w > 0 for w in weights):
        raise typer.BadParameter(f"{value!r}: give auto or one positive number per node (root first): 3,1,1")
    return weights


Split = Annotated[
    str | None,
    typer.Option(
        "--split",
        callback=_check_split,
        help="a cluster's shares: auto (default: in proportion to each node's measured speed) or one number "
        "per node, root first (3,1,1: the root gets 3/5 of the heads, FFN rows and vocabulary)",
    ),
]
NetTimeout = Annotated[
    float,
    typer.Option(
        "--net-timeout",
        callback=_in_range(
            lambda t: 0 < t <= MAX_NET_TIMEOUT, f"give seconds above 0, at most {MAX_NET_TIMEOUT:g}"
        ),
        help="how long a silent worker may stall a forward pass (s, above 0)",
    ),
]
Template = Annotated[
    str | None,
    typer.Option(
        "--chat-template",
        callback=_check_template,
        help="llama2, llama3, chatml or deepseek (default: the model's own)",
    ),
]
Prompt = Annotated[str, typer.Option("--prompt", callback=as_text, help="prompt text")]
Host = Annotated[
    str, typer.Option("--host", callback=_non_empty("an address to bind"), help="address to bind")
]


def _set_gpu_index(ctx: typer.Context, value: int | None) -> int | None:
    """--gpu-index given after the command overrides one given before it (both land in ctx.obj)."""
    if value is not None:
        if value < 0:
            raise typer.BadParameter(
                f"{value} is out of range: give 0 or more (Vulkan devices are 0, 1, ...)"
            )
        ctx.ensure_object(dict)["gpu_index"] = value
    return value


GpuIndex = Annotated[
    int | None,
    typer.Option(
        "--gpu-index",
        callback=_set_gpu_index,
        help="Vulkan device for --backend vulkan/auto (0, 1, ...; default: the first)",
    ),
]


@app.callback()
def _global(
    ctx: typer.Context,
    backend: Annotated[
        str,
        typer.Option(
            "--backend",
            help="compute backend: cpu, vulkan (GLSL shaders through Kompute) or "
            "auto (the first Vulkan GPU, else cpu)",
        ),
    ] = "cpu",
    gpu_index: GpuIndex = None,
) -> None:
    ctx.obj = {"backend": backend, "gpu_index": gpu_index}
    if ctx.invoked_subcommand is None:
        print(ctx.get_help())


def _backend(ctx: typer.Context, local: str | None) -> str:
    return local if local is not None else ctx.obj["backend"]


def _expand_workers(argv: list[str]) -> list[str]:
    """The original's `--workers a:p b:q` (every following word that is not an option) as repeated flags."""
    out, i = [], 0
    while i < len(argv):
        out.append(argv[i])
        i += 1
        if out[-1] == "--workers":
            n = 0
            while i < len(argv) and not argv[i].startswith("-"):
                out.extend(["--workers", argv[i]] if n else [argv[i]])
                n, i = n + 1, i + 1
    return out


def _load(
    ctx,
    model,
    tokenizer,
    backend,
    buffer_float_type,
    nthreads,
    max_seq_len,
    workers,
    net_timeout,
    split,
    kv_cache_type="f32",
):
    from engine.loader import load

    if split is not None and not workers:
        raise DllamaError("--split shares the work of a cluster: give --workers too")
    loaded = load(
        model,
        tokenizer,
        _backend(ctx, backend),
        buffer_float_type,
        nthreads,
        max_seq_len,
        workers or [],
        net_timeout,
        gpu_index=ctx.obj.get("gpu_index"),
        split=split,
        kv_type=kv_cache_type,
    )
    ctx.call_on_close(loaded.runner.close)  # workers are released however the command ends
    cfg, r = loaded.model.config, loaded.runner
    print(
        f"💡 Model {Path(loaded.model.path).name}: {cfg.arch}, dim {cfg.dim}, {cfg.n_layers} layers, "
        f"{cfg.n_heads} heads / {cfg.n_kv_heads} KV heads, vocab {cfg.vocab_size}, context {cfg.context_len}"
    )
    print(
        f"🧠 Backend {r.backend.description}; buffers {buffer_float_type}; KV cache {r.kv_type}; "
        f"max seq len {r.max_seq_len}; "
        f"weights read per token {r.weight_bytes_per_token / 1e6:.1f} MB"
    )
    return loaded


def _write_json(path: str, obj: dict) -> None:
    """Write atomically, so a failed run leaves no half-written file."""
    with atomic_write(path) as f:
        f.write((json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode())


def _read_text(path: str) -> str:
    """A perplexity --file: a regular file of at most TEXT_LIMIT bytes; invalid UTF-8 becomes U+FFFD."""
    with open_regular(path, "--file takes a text file") as f:
        try:
            data = f.read(TEXT_LIMIT + 1)
        except OSError as e:
            raise DllamaError(f"cannot read --file {path}: {e.strerror}") from None
    if len(data) > TEXT_LIMIT:
        raise DllamaError(
            f"--file {path} is over {TEXT_LIMIT >> 20} MiB, more text than any context holds: "
            "score a part of it"
        )
    return data.decode("utf-8", "replace")


def _line(sym: str, label: str, st, tail: str) -> str:
    if st is None:
        return f"{sym} {label}    - ms Sync    - ms | Sent     - kB Recv     - kB | {tail}"
    return (
        f"{sym} {label}{st.eval_s * 1e3:5.0f} ms Sync{st.sync_s * 1e3:5.0f} ms | "
        f"Sent{st.sent // 1024:6d} kB Recv{st.recv // 1024:6d} kB | {tail}"
    )


# ---- inference: generation with a benchmark read-out ----
@app.command()
def inference(
    ctx: typer.Context,
    prompt: Prompt,
    steps: Annotated[
        int,
        typer.Option(
            "--steps",
            callback=_in_range(lambda n: n >= 1, "give at least 1"),
            help="tokens to generate, >= 1",
        ),
    ] = 64,
    model: Model = None,
    tokenizer: TokenizerOpt = None,
    buffer_float_type: BufType = "f32",
    kv_cache_type: KvType = "f32",
    nthreads: Threads = None,
    max_seq_len: SeqLen = None,
    temperature: Temp = 0.8,
    topp: TopP = 0.9,
    seed: Seed = None,
    backend: BackendOpt = None,
    gpu_index: GpuIndex = None,
    json_out: JsonOut = None,
    workers: Workers = None,
    net_timeout: NetTimeout = NET_TIMEOUT,
    split: Split = None,
    ignore_eos: Annotated[
        bool, typer.Option("--ignore-eos", help="keep generating past end-of-sequence")
    ] = False,
) -> None:
    """Generate text from a prompt and report per-token timings, tokens/s and GB/s."""
    from engine.generate import Metrics, generate
    from engine.sampler import Sampler

    loaded = _load(
        ctx,
        model,
        tokenizer,
        backend,
        buffer_float_type,
        nthreads,
        max_seq_len,
        workers,
        net_timeout,
        split,
        kv_cache_type,
    )
    tok, runner = loaded.tokenizer, loaded.runner
    ids = tok.encode(prompt)
    if not ids:
        raise DllamaError("the prompt encodes to no tokens: give a non-empty --prompt")
    if len(ids) >= runner.max_seq_len:
        raise DllamaError(f"the prompt has {len(ids)} tokens but --max-seq-len is {runner.max_seq_len}")
    sampler = Sampler(tok.vocab_size, temperature, topp, seed if seed is not None else time.time_ns())
    print(prompt)
    m = Metrics()
    pieces = []
    for ev in generate(runner, tok, ids, steps, sampler, stop_at_eos=not ignore_eos, metrics=m):
        if ev.kind == "prefill":
            print(_line("🔷️", "Eval", ev.stats, f"({ev.n_tokens} tokens)"))
        else:
            pieces.append(ev.text)
            print(_line("🔶", "Pred", ev.stats, ev.text.replace("\n", "\\n")), flush=True)
    text = "".join(pieces)
    gbps = Metrics.rate(m.decode) * runner.weight_bytes_per_token / 1e9
    n_gen = len(m.generated)
    print("Evaluation")
    print(f"   nBatches: {runner.max_batch}\n    nTokens: {m.prefill.n_tokens}")
    print(
        f"   tokens/s: {m.prefill_rate():.2f} end to end (first token after {m.first_token_s * 1e3:.2f} ms), "
        f"forward {Metrics.rate(m.prefill):.2f} ({_ms_per(m.prefill):.2f} ms/tok)"
    )
    print("Prediction")
    print(f"    nTokens: {n_gen} ({m.decode.n_tokens} decode passes)")
    e2e = m.decode_rate()
    print(
        f"   tokens/s: {e2e:.2f} end to end ({1e3 / e2e if e2e else 0:.2f} ms/tok), "
        f"forward {Metrics.rate(m.decode):.2f} ({_ms_per(m.decode):.2f} ms/tok)"
    )
    print(f"   sampling: {m.sample_s * 1e3 / max(n_gen, 1):.3f} ms/tok")
    syncs = sum(seg.sync is not None for seg in runner.graph.segments)  # all-slices exchanges per pass
    sync_ms = m.decode.sync_s * 1e3 / max(m.decode.n_tokens, 1)
    if runner.n_nodes > 1:
        dec, d = m.decode, max(m.decode.n_tokens, 1)
        print(
            f"  per token: eval {dec.eval_s * 1e3 / d:.2f} ms, sync {sync_ms:.2f} ms "
            f"({syncs} exchanges, {sync_ms / max(syncs, 1):.3f} ms each), "
            f"sent {dec.sent / d / 1024:.1f} kB, recv {dec.recv / d / 1024:.1f} kB ({runner.n_nodes} nodes)"
        )
    print(
        f"       GB/s: {gbps:.2f} (forward passes; weights read per token "
        f"{runner.weight_bytes_per_token / 1e6:.1f} MB)"
    )
    print(f"Output\n{prompt}{text}")
    if json_out:
        _write_json(
            json_out,
            {
                "prompt": prompt,
                "prompt_ids": ids,
                "generated_ids": m.generated,
                "text": text,
                "stop_reason": m.stop_reason,
                "backend": runner.backend.description,
                "buffer_float_type": buffer_float_type,
                "kv_cache_type": kv_cache_type,
                "prefill_tokens": m.prefill.n_tokens,
                "prefill_tokens_per_s": m.prefill_rate(),
                "prefill_forward_tokens_per_s": Metrics.rate(m.prefill),
                "first_token_s": m.first_token_s,
                "decode_tokens": m.decode.n_tokens,
                "decode_tokens_per_s": e2e,
                "decode_forward_tokens_per_s": Metrics.rate(m.decode),
                "decode_wall_s": m.decode_wall_s,
                "sample_ms_per_token": m.sample_s * 1e3 / max(n_gen, 1),
                "decode_gbytes_per_s": gbps,
                "weight_bytes_per_token": runner.weight_bytes_per_token,
                "sent_bytes": m.prefill.sent + m.decode.sent,
                "recv_bytes": m.prefill.recv + m.decode.recv,
                "nodes": runner.n_nodes,
                "decode_eval_s": m.decode.eval_s,
                "decode_sync_s": m.decode.sync_s,
                "decode_exchanges_per_token": syncs if runner.n_nodes > 1 else 0,
                "decode_sync_ms_per_exchange": sync_ms / syncs if runner.n_nodes > 1 and syncs else 0.0,
                "decode_sent_bytes_per_token": m.decode.sent / m.decode.n_tokens if m.decode.n_tokens else 0,
                "decode_recv_bytes_per_token": m.decode.recv / m.decode.n_tokens if m.decode.n_tokens else 0,
                "split": runner.split_table,
            },
        )


def _ms_per(st) -> float:
    return (st.eval_s + st.sync_s) * 1e3 / st.n_tokens if st.n_tokens else 0.0


# ---- perplexity ----
@app.command()
def perplexity(
    ctx: typer.Context,
    file: Annotated[
        str | None,
        typer.Option(
            "--file",
            callback=_non_empty("a text file"),
            help=f"text file to score (at most {TEXT_LIMIT >> 20} MiB)",
        ),
    ] = None,
    prompt: Annotated[str | None, typer.Option("--prompt", callback=as_text, help="text to score")] = None,
    model: Model = None,
    tokenizer: TokenizerOpt = None,
    buffer_float_type: BufType = "f32",
    kv_cache_type: KvType = "f32",
    nthreads: Threads = None,
    max_seq_len: SeqLen = None,
    backend: BackendOpt = None,
    gpu_index: GpuIndex = None,
    json_out: JsonOut = None,
    workers: Workers = None,
    net_timeout: NetTimeout = NET_TIMEOUT,
    split: Split = None,
) -> None:
    """Score every token after the first given all before it; print perplexity and average log-prob."""
    if (file is None) == (prompt is None):
        raise DllamaError("give exactly one of --file FILE or --prompt TEXT")
    text = _read_text(file) if file is not None else prompt
    loaded = _load(
        ctx,
        model,
        tokenizer,
        backend,
        buffer_float_type,
        nthreads,
        max_seq_len,
        workers,
        net_timeout,
        split,
        kv_cache_type,
    )
    ids = loaded.tokenizer.encode(text)
    if len(ids) < 2:
        raise DllamaError("the text has fewer than 2 tokens: nothing to score")
    if len(ids) > loaded.runner.max_seq_len:
        raise DllamaError(f"the text has {len(ids)} tokens but --max-seq-len is {loaded.runner.max_seq_len}")
    from engine.generate import Metrics
    from engine.runner import ForwardStats

    t0, st = time.perf_counter(), ForwardStats()
    logits = loaded.runner.forward(ids, 0, "all", st)
    logp = log_softmax_at(logits[:-1], np.asarray(ids[1:]))
    avg = float(logp.mean())
    ppl = math.exp(-avg)
    dt = time.perf_counter() - t0
    print("Results")
    print(f"   perplexity: {ppl:.4f}\n   avgLogProb: {avg:.5f}\n   bitPerToken: {-avg / math.log(2):.4f}")
    print(
        f"   nScored: {len(ids) - 1} ({len(ids) / dt:.1f} tokens/s end to end, "
        f"forward {Metrics.rate(st):.1f} tokens/s)"
    )
    if json_out:
        _write_json(
            json_out,
            {
                "perplexity": ppl,
                "avg_logprob": avg,
                "n_scored": len(ids) - 1,
                "n_tokens": len(ids),
                "tokens_per_s": len(ids) / dt,
                "forward_tokens_per_s": Metrics.rate(st),
            },
        )


def log_softmax_at(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """log p(ids[t]) under softmax(logits[t]), in float64."""
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    lse = np.log(np.exp(z).sum(axis=1))
    return z[np.arange(len(ids)), ids] - lse


# ---- chat ----
@app.command()
def chat(
    ctx: typer.Context,
    system: Annotated[
        str | None,
        typer.Option("--system", callback=as_text, help="system prompt (asked for when interactive)"),
    ] = None,
    chat_template: Template = None,
    max_tokens: Annotated[
        int,
        typer.Option(
            "--max-tokens",
            callback=_in_range(lambda n: n >= 1, "give at least 1"),
            help="longest reply in tokens, >= 1",
        ),
    ] = 1024,
    model: Model = None,
    tokenizer: TokenizerOpt = None,
    buffer_float_type: BufType = "f32",
    kv_cache_type: KvType = "f32",
    nthreads: Threads = None,
    max_seq_len: SeqLen = None,
    temperature: Temp = 0.8,
    topp: TopP = 0.9,
    seed: Seed = None,
    backend: BackendOpt = None,
    gpu_index: GpuIndex = None,
    workers: Workers = None,
    net_timeout: NetTimeout = NET_TIMEOUT,
    split: Split = None,
) -> None:
    """Multi-turn conversation through the model's chat template; the KV cache is kept across turns."""
    from engine.chat import run_chat

    loaded = _load(
        ctx,
        model,
        tokenizer,
        backend,
        buffer_float_type,
        nthreads,
        max_seq_len,
        workers,
        net_timeout,
        split,
        kv_cache_type,
    )
    run_chat(
        loaded,
        system=system,
        template_name=chat_template,
        max_tokens=max_tokens,
        temperature=temperature,
        topp=topp,
        seed=seed if seed is not None else time.time_ns(),
    )


# ---- convert ----
@app.command()
def convert(
    model: Annotated[
        str,
        typer.Option(
            "--model",
            "--hf",
            callback=_non_empty("a GGUF file, a Hugging Face checkpoint folder or a model name"),
            help="source: a GGUF file, a Hugging Face checkpoint folder (config.json, *.safetensors, "
            "tokenizer.json) or a model name",
        ),
    ],
    output: Annotated[
        str,
        typer.Option(
            "--output", callback=_check_output, help="the file to write: NAME.gguf for a GGUF, else a .m"
        ),
    ],
    weights_float_type: Annotated[
        str,
        typer.Option(
            "--weights-float-type",
            help="matrix type: f32, f16, q40 or q80 for a .m; any of f32 f16 bf16 q40 q41 q50 q51 q80 q4k "
            "q5k q6k for a GGUF",
        ),
    ] = "q40",
    tokenizer_output: Annotated[
        str | None,
        typer.Option("--tokenizer-output", callback=_check_output, help="also write this .t (with a .m)"),
    ] = None,
) -> None:
    """Write a GGUF, or a distributed-llama .m (and .t), from a GGUF file or a Hugging Face checkpoint."""
    from engine.catalog import resolve_model
    from engine.convert import M_WEIGHT_TYPES, convert
    from engine.gguf_writer import GGUF_WEIGHT_TYPES

    kind, types = ("GGUF", GGUF_WEIGHT_TYPES) if output.endswith(".gguf") else (".m", M_WEIGHT_TYPES)
    if weights_float_type not in types:
        raise DllamaError(
            f"unknown --weights-float-type {weights_float_type!r} for a {kind} output: choose "
            + ", ".join(types)
        )
    convert(str(resolve_model(model)), output, weights_float_type, tokenizer_output)


# ---- pull and launch: models by name ----
DirOpt = Annotated[
    str | None,
    typer.Option("--dir", help="folder for models (default: $DLLAMA_CACHE, else ~/.cache/dllama)"),
]


@app.command()
def pull(
    name: Annotated[
        str, typer.Argument(help="a name from `dllama launch`, hf://OWNER/REPO/FILE.gguf, or an https:// URL")
    ],
    directory: DirOpt = None,
) -> None:
    """Download a model (resumable, size and sha256 verified); a complete one costs no network."""
    from engine.launch import pull_command

    pull_command(name, directory)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def launch(
    ctx: typer.Context,
    name: Annotated[str | None, typer.Argument(help="model name or URL (none: list the catalogue)")] = None,
    directory: DirOpt = None,
) -> None:
    """Pull a model if missing, then run it: `dllama launch NAME [chat|inference|api|worker] [options]`."""
    from engine.launch import launch_command

    before = ["--backend", ctx.obj["backend"]]
    if ctx.obj.get("gpu_index") is not None:
        before += ["--gpu-index", str(ctx.obj["gpu_index"])]
    launch_command(name, None, ctx.args, directory, before)


# ---- worker ----
@app.command()
def worker(
    ctx: typer.Context,
    port: Annotated[
        int, typer.Option("--port", callback=PORT_RANGE, help="TCP port to listen on (0: any free port)")
    ] = 9990,
    host: Host = "0.0.0.0",
    nthreads: Threads = None,
    backend: BackendOpt = None,
    gpu_index: GpuIndex = None,
    cache_dir: Annotated[
        str | None,
        typer.Option(
            "--cache-dir",
            help="keep received slices in this folder: a root reconnecting with the same model and split "
            "sends only what is missing (default: no cache)",
        ),
    ] = None,
    cache_size: Annotated[
        str | None,
        typer.Option("--cache-size", help="bound of the --cache-dir folder, e.g. 20G (default: no bound)"),
    ] = None,
) -> None:
    """Serve roots one at a time: receive a model slice, compute it for every token, free it afterwards."""
    from engine.loader import make_backend
    from net.slice_cache import parse_size
    from net.worker import serve

    if cache_size is not None and cache_dir is None:
        raise DllamaError("--cache-size bounds the slice cache: give --cache-dir too")
    limit = parse_size(cache_size) if cache_size is not None else None
    be = make_backend(_backend(ctx, backend), nthreads, ctx.obj.get("gpu_index"))
    serve(host, port, be, cache_dir=cache_dir, cache_size=limit)


# ---- api: the OpenAI-compatible HTTP server (also installed as `dllama-api`) ----
@app.command()
def api(
    ctx: typer.Context,
    host: Host = "127.0.0.1",
    port: Annotated[
        int, typer.Option("--port", callback=PORT_RANGE, help="TCP port (0: any free port)")
    ] = 9990,
    queue_size: Annotated[
        int,
        typer.Option(
            "--queue-size",
            callback=_in_range(lambda n: n >= 0, "give 0 or more"),
            help="requests that may wait for the engine (>= 0); more get HTTP 429",
        ),
    ] = 64,
    request_timeout: Annotated[
        float,
        typer.Option(
            "--request-timeout",
            callback=_in_range(lambda t: t > 0, "give a number of seconds above 0"),
            help="seconds a client has for a request's headers, and again for its body; slower: closed / 408",
        ),
    ] = 30.0,
    keep_alive: Annotated[
        float,
        typer.Option(
            "--keep-alive",
            callback=_in_range(lambda t: t > 0, "give a number of seconds above 0"),
            help="seconds an idle keep-alive connection stays open after a response",
        ),
    ] = 5.0,
    parallel: Annotated[
        int | None,
        typer.Option(
            "--parallel",
            callback=_in_range(lambda n: 1 <= n <= 32, "give 1 to 32"),
            help="requests decoded together, each in its own KV-cache slot (default: 4 on one CPU node, "
            "else 1; any backend, on one node or in a cluster)",
        ),
    ] = None,
    chat_template: Template = None,
    model: Model = None,
    tokenizer: TokenizerOpt = None,
    buffer_float_type: BufType = "f32",
    kv_cache_type: KvType = "f32",
    nthreads: Threads = None,
    max_seq_len: SeqLen = None,
    temperature: Temp = 0.8,
    topp: TopP = 0.9,
    seed: Annotated[
        int | None,
        typer.Option(
            "--seed",
            callback=SEED_RANGE,
            help="seed of requests that give none, 0 to 2^64-1 (default: random each)",
        ),
    ] = None,
    backend: BackendOpt = None,
    gpu_index: GpuIndex = None,
    workers: Workers = None,
    net_timeout: NetTimeout = NET_TIMEOUT,
    split: Split = None,
) -> None:
    """Serve the model over OpenAI's HTTP API (chat and text completions, streaming, models, health)."""
    from engine.server.main import ServerOptions, serve

    serve(
        ServerOptions(
            model=model,
            tokenizer=tokenizer,
            backend=_backend(ctx, backend),
            gpu_index=ctx.obj.get("gpu_index"),
            act=buffer_float_type,
            kv_type=kv_cache_type,
            n_threads=nthreads,
            max_seq_len=max_seq_len,
            workers=workers or [],
            net_timeout=net_timeout,
            split=split,
            temperature=temperature,
            top_p=topp,
            seed=seed,
            chat_template=chat_template,
            host=host,
            port=port,
            queue_size=queue_size,
            request_timeout=request_timeout,
            keep_alive=keep_alive,
            parallel=parallel,
        )
    )


# ---- bench-shaders: tools/shader_bench.py of a source checkout ----
@app.command(
    "bench-shaders",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def bench_shaders(ctx: typer.Context) -> None:
    """Time every Vulkan shader against the CPU backend and the device's copy bandwidth (options: --help)."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "tools" / "shader_bench.py"
    if not path.is_file():
        raise DllamaError(f"bench-shaders needs a source checkout: {path} is missing")
    spec = importlib.util.spec_from_file_location("shader_bench", path)
    tool = sys.modules["shader_bench"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    gpu = ctx.obj.get("gpu_index")
    tool.main((["--gpu-index", str(gpu)] if gpu is not None else []) + list(ctx.args))


def _on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM unwinds like Ctrl-C (temp files removed, workers released); main() then exits 143."""
    _stopped_by.append(signum)
    raise KeyboardInterrupt


_stopped_by: list[int] = []  # SIGTERM once it has arrived


def _interrupted() -> NoReturn:
    """One line, then 130 (Ctrl-C) or 143 (SIGTERM); further signals are ignored while exiting."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    by_term = signal.SIGTERM in _stopped_by
    print(
        ("\n" if sys.stderr.isatty() else "") + ("interrupted (SIGTERM)" if by_term else "interrupted"),
        file=sys.stderr,
    )
    sys.exit(143 if by_term else 130)


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one line on stderr and exit code 2, never a traceback; Ctrl-C exits
    130 and SIGTERM 143, each with the one line "interrupted"."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        args = _expand_workers(sys.argv[1:] if argv is None else list(argv))
        code = app(args=args, prog_name="dllama", standalone_mode=False)
    except typer.TyperException as e:  # usage errors of the command-line parser
        ctx = getattr(e, "ctx", None)
        cmd = ctx.command_path if ctx else "dllama"
        print(f"error: {e.format_message()} (see `{cmd} --help`)", file=sys.stderr)
        sys.exit(2)
    except DllamaError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (KeyboardInterrupt, typer.Abort):
        _interrupted()
    except MemoryError:
        print("error: out of memory: use a smaller --max-seq-len or model", file=sys.stderr)
        sys.exit(2)
    except BrokenPipeError:
        sys.exit(1)
    if code == 130:  # typer's answer to a KeyboardInterrupt inside a command
        _interrupted()
    if code:
        sys.exit(code)


if __name__ == "__main__":
    main()
