"""The `dllama` command line: inference, chat, perplexity, convert."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from engine.errors import DllamaError
from net.protocol import NET_TIMEOUT

app = typer.Typer(
    add_completion=False,
    invoke_without_command=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    help="Tensor-parallel LLM inference on CPU and Vulkan nodes.",
)

# ---- options shared by the commands that load a model ----
Model = Annotated[
    str | None,
    typer.Option(
        "--model",
        help="GGUF or .m file, or a model name: smollm2 (the embedded default), qwen2.5-coder (fetched once "
        "into ~/.cache/dllama)",
    ),
]
TokenizerOpt = Annotated[
    str | None, typer.Option("--tokenizer", help=".t or GGUF tokenizer (a GGUF model has its own)")
]
BufType = Annotated[str, typer.Option("--buffer-float-type", help="activation/sync numbers: f32 or q80")]
Threads = Annotated[int | None, typer.Option("--nthreads", help="CPU threads (default: all cores)")]
SeqLen = Annotated[
    int | None, typer.Option("--max-seq-len", help="context to allocate (default min(model, 4096))")
]
Temp = Annotated[float, typer.Option("--temperature", help="0 = greedy")]
TopP = Annotated[float, typer.Option("--topp", help="nucleus sampling mass")]
Seed = Annotated[int | None, typer.Option("--seed", help="random seed (default: time)")]
BackendOpt = Annotated[
    str | None, typer.Option("--backend", help="cpu, vulkan or auto (also accepted before the command)")
]
JsonOut = Annotated[str | None, typer.Option("--json", help="write the results as one JSON object to FILE")]
Workers = Annotated[
    list[str] | None,
    typer.Option(
        "--workers",
        help="worker HOST:PORT addresses: several after one flag (`--workers a:9990 b:9990`), the flag "
        "repeated, or comma-separated; this node becomes the root of the cluster",
    ),
]
NetTimeout = Annotated[
    float,
    typer.Option("--net-timeout", help="how long a silent worker may stall a forward pass (s)"),
]


def _set_gpu_index(ctx: typer.Context, value: int | None) -> int | None:
    """--gpu-index given after the command overrides one given before it (both land in ctx.obj)."""
    if value is not None:
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


def _worker_list(values: list[str] | None) -> list[str]:
    """Every address of every --workers value (a value may hold several, comma or space separated)."""
    return [a for v in values or [] for a in v.replace(",", " ").split()]


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


def _load(ctx, model, tokenizer, backend, buffer_float_type, nthreads, max_seq_len, workers, net_timeout):
    from engine.loader import load

    loaded = load(
        model,
        tokenizer,
        _backend(ctx, backend),
        buffer_float_type,
        nthreads,
        max_seq_len,
        _worker_list(workers),
        net_timeout,
        gpu_index=ctx.obj.get("gpu_index"),
    )
    ctx.call_on_close(loaded.runner.close)  # workers are released however the command ends
    cfg, r = loaded.model.config, loaded.runner
    print(
        f"💡 Model {Path(loaded.model.path).name}: {cfg.arch}, dim {cfg.dim}, {cfg.n_layers} layers, "
        f"{cfg.n_heads} heads / {cfg.n_kv_heads} KV heads, vocab {cfg.vocab_size}, context {cfg.context_len}"
    )
    print(
        f"🧠 Backend {r.backend.description}; buffers {buffer_float_type}; max seq len {r.max_seq_len}; "
        f"weights read per token {r.weight_bytes_per_token / 1e6:.1f} MB"
    )
    return loaded


def _write_json(path: str, obj: dict) -> None:
    """Write atomically, so a failed run leaves no half-written file."""
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise DllamaError(f"cannot write {path}: {e.strerror}") from None


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
    prompt: Annotated[str, typer.Option("--prompt", help="prompt text")],
    steps: Annotated[int, typer.Option("--steps", help="tokens to generate")] = 64,
    model: Model = None,
    tokenizer: TokenizerOpt = None,
    buffer_float_type: BufType = "f32",
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
    ignore_eos: Annotated[
        bool, typer.Option("--ignore-eos", help="keep generating past end-of-sequence")
    ] = False,
) -> None:
    """Generate text from a prompt and report per-token timings, tokens/s and GB/s."""
    from engine.generate import Metrics, generate
    from engine.sampler import Sampler

    if steps < 1:
        raise DllamaError(f"--steps must be at least 1 (got {steps})")
    loaded = _load(
        ctx, model, tokenizer, backend, buffer_float_type, nthreads, max_seq_len, workers, net_timeout
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
    print("Evaluation")
    print(f"   nBatches: {runner.max_batch}\n    nTokens: {m.prefill.n_tokens}")
    print(f"   tokens/s: {Metrics.rate(m.prefill):.2f} ({_ms_per(m.prefill):.2f} ms/tok)")
    print("Prediction")
    print(f"    nTokens: {len(m.generated)} ({m.decode.n_tokens} decode passes)")
    print(f"   tokens/s: {Metrics.rate(m.decode):.2f} ({_ms_per(m.decode):.2f} ms/tok)")
    if runner.n_nodes > 1:
        dec, d = m.decode, max(m.decode.n_tokens, 1)
        print(
            f"  per token: eval {dec.eval_s * 1e3 / d:.2f} ms, sync {dec.sync_s * 1e3 / d:.2f} ms, "
            f"sent {dec.sent / d / 1024:.1f} kB, recv {dec.recv / d / 1024:.1f} kB ({runner.n_nodes} nodes)"
        )
    print(f"       GB/s: {gbps:.2f} (weights read per token {runner.weight_bytes_per_token / 1e6:.1f} MB)")
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
                "prefill_tokens": m.prefill.n_tokens,
                "prefill_tokens_per_s": Metrics.rate(m.prefill),
                "decode_tokens": m.decode.n_tokens,
                "decode_tokens_per_s": Metrics.rate(m.decode),
                "decode_gbytes_per_s": gbps,
                "weight_bytes_per_token": runner.weight_bytes_per_token,
                "sent_bytes": m.prefill.sent + m.decode.sent,
                "recv_bytes": m.prefill.recv + m.decode.recv,
                "nodes": runner.n_nodes,
                "decode_eval_s": m.decode.eval_s,
                "decode_sync_s": m.decode.sync_s,
                "decode_sent_bytes_per_token": m.decode.sent / m.decode.n_tokens if m.decode.n_tokens else 0,
                "decode_recv_bytes_per_token": m.decode.recv / m.decode.n_tokens if m.decode.n_tokens else 0,
            },
        )


def _ms_per(st) -> float:
    return (st.eval_s + st.sync_s) * 1e3 / st.n_tokens if st.n_tokens else 0.0


# ---- perplexity ----
@app.command()
def perplexity(
    ctx: typer.Context,
    file: Annotated[str | None, typer.Option("--file", help="text file to score")] = None,
    prompt: Annotated[str | None, typer.Option("--prompt", help="text to score")] = None,
    model: Model = None,
    tokenizer: TokenizerOpt = None,
    buffer_float_type: BufType = "f32",
    nthreads: Threads = None,
    max_seq_len: SeqLen = None,
    backend: BackendOpt = None,
    gpu_index: GpuIndex = None,
    json_out: JsonOut = None,
    workers: Workers = None,
    net_timeout: NetTimeout = NET_TIMEOUT,
) -> None:
    """Score every token after the first given all before it; print perplexity and average log-prob."""
    if (file is None) == (prompt is None):
        raise DllamaError("give exactly one of --file FILE or --prompt TEXT")
    if file is not None:
        try:
            text = Path(file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise DllamaError(f"cannot read {file}: {getattr(e, 'strerror', None) or e}") from None
    else:
        text = prompt
    loaded = _load(
        ctx, model, tokenizer, backend, buffer_float_type, nthreads, max_seq_len, workers, net_timeout
    )
    ids = loaded.tokenizer.encode(text)
    if len(ids) < 2:
        raise DllamaError("the text has fewer than 2 tokens: nothing to score")
    if len(ids) > loaded.runner.max_seq_len:
        raise DllamaError(f"the text has {len(ids)} tokens but --max-seq-len is {loaded.runner.max_seq_len}")
    t0 = time.perf_counter()
    logits = loaded.runner.forward(ids, 0, "all")
    logp = log_softmax_at(logits[:-1], np.asarray(ids[1:]))
    avg = float(logp.mean())
    ppl = math.exp(-avg)
    dt = time.perf_counter() - t0
    print("Results")
    print(f"   perplexity: {ppl:.4f}\n   avgLogProb: {avg:.5f}\n   bitPerToken: {-avg / math.log(2):.4f}")
    print(f"   nScored: {len(ids) - 1} ({len(ids) / dt:.1f} tokens/s)")
    if json_out:
        _write_json(
            json_out,
            {
                "perplexity": ppl,
                "avg_logprob": avg,
                "n_scored": len(ids) - 1,
                "n_tokens": len(ids),
                "tokens_per_s": len(ids) / dt,
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
        str | None, typer.Option("--system", help="system prompt (asked for when interactive)")
    ] = None,
    chat_template: Annotated[
        str | None,
        typer.Option("--chat-template", help="llama2, llama3, chatml or deepseek (default: the model's own)"),
    ] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="longest reply in tokens")] = 1024,
    model: Model = None,
    tokenizer: TokenizerOpt = None,
    buffer_float_type: BufType = "f32",
    nthreads: Threads = None,
    max_seq_len: SeqLen = None,
    temperature: Temp = 0.8,
    topp: TopP = 0.9,
    seed: Seed = None,
    backend: BackendOpt = None,
    gpu_index: GpuIndex = None,
    workers: Workers = None,
    net_timeout: NetTimeout = NET_TIMEOUT,
) -> None:
    """Multi-turn conversation through the model's chat template; the KV cache is kept across turns."""
    from engine.chat import run_chat

    loaded = _load(
        ctx, model, tokenizer, backend, buffer_float_type, nthreads, max_seq_len, workers, net_timeout
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
    model: Annotated[str, typer.Option("--model", help="source GGUF file or a model name")],
    output: Annotated[str, typer.Option("--output", help="the .m file to write")],
    weights_float_type: Annotated[
        str, typer.Option("--weights-float-type", help="f32, f16, q40 or q80")
    ] = "q40",
    tokenizer_output: Annotated[
        str | None, typer.Option("--tokenizer-output", help="also write this .t")
    ] = None,
) -> None:
    """Write a distributed-llama .m (and .t) from a GGUF file."""
    from engine.catalog import resolve_model
    from engine.convert import convert_gguf

    if weights_float_type not in ("f32", "f16", "q40", "q80"):
        raise DllamaError(f"unknown --weights-float-type {weights_float_type!r}: choose f32, f16, q40 or q80")
    convert_gguf(str(resolve_model(model)), output, weights_float_type, tokenizer_output)


# ---- worker ----
@app.command()
def worker(
    ctx: typer.Context,
    port: Annotated[int, typer.Option("--port", help="TCP port to listen on (0: any free port)")] = 9990,
    host: Annotated[str, typer.Option("--host", help="address to bind (default: all)")] = "0.0.0.0",
    nthreads: Threads = None,
    backend: BackendOpt = None,
    gpu_index: GpuIndex = None,
) -> None:
    """Serve roots one at a time: receive a model slice, compute it for every token, free it afterwards."""
    from engine.loader import make_backend
    from net.worker import serve

    if not 0 <= port <= 65535:
        raise DllamaError(f"--port {port} is out of range (0..65535)")
    serve(host, port, make_backend(_backend(ctx, backend), nthreads, ctx.obj.get("gpu_index")))


# ---- api: the OpenAI-compatible HTTP server (also installed as `dllama-api`) ----
@app.command()
def api(
    ctx: typer.Context,
    host: Annotated[str, typer.Option("--host", help="address to serve on")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port (0: any free port)")] = 9990,
    queue_size: Annotated[
        int, typer.Option("--queue-size", help="requests that may wait for the engine; more get HTTP 429")
    ] = 64,
    chat_template: Annotated[
        str | None,
        typer.Option("--chat-template", help="llama2, llama3, chatml or deepseek (default: the model's own)"),
    ] = None,
    model: Model = None,
    tokenizer: TokenizerOpt = None,
    buffer_float_type: BufType = "f32",
    nthreads: Threads = None,
    max_seq_len: SeqLen = None,
    temperature: Temp = 0.8,
    topp: TopP = 0.9,
    seed: Annotated[
        int | None, typer.Option("--seed", help="seed of requests that give none (default: random each)")
    ] = None,
    backend: BackendOpt = None,
    gpu_index: GpuIndex = None,
    workers: Workers = None,
    net_timeout: NetTimeout = NET_TIMEOUT,
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
            n_threads=nthreads,
            max_seq_len=max_seq_len,
            workers=_worker_list(workers),
            net_timeout=net_timeout,
            temperature=temperature,
            top_p=topp,
            seed=seed,
            chat_template=chat_template,
            host=host,
            port=port,
            queue_size=queue_size,
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


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one line on stderr and exit code 2, never a traceback."""
    try:
        args = _expand_workers(sys.argv[1:] if argv is None else list(argv))
        app(args=args, prog_name="dllama", standalone_mode=False)
    except typer.TyperException as e:  # usage errors of the command-line parser
        ctx = getattr(e, "ctx", None)
        cmd = ctx.command_path if ctx else "dllama"
        print(f"error: {e.format_message()} (see `{cmd} --help`)", file=sys.stderr)
        sys.exit(2)
    except DllamaError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (KeyboardInterrupt, typer.Abort):
        print(file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(1)


if __name__ == "__main__":
    main()
