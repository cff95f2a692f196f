"""Running the server: bind the socket, start uvicorn with the app, load the model in the background, and shut
down gracefully on SIGTERM (the running generation finishes, waiting ones get 503, then the process exits 0);
Ctrl-C shuts down the same way, then `dllama` exits 130 ("interrupted").
"""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import uvicorn
from sse_starlette.sse import AppStatus

from engine.chat_template import BUILTIN_TEMPLATES
from engine.errors import DllamaError
from engine.loader import Loaded, load
from engine.server.app import BODY_TIMEOUT, Defaults, create_app
from engine.server.limits import bounded_protocol
from engine.server.scheduler import Scheduler

GRACE_S = 30.0  # seconds in-flight requests get to finish after SIGTERM before they are cancelled
DEFAULT_QUEUE = 64
DEFAULT_PARALLEL = 4  # KV slots on one CPU node: requests decoded together in one forward pass
KEEP_ALIVE_S = 5.0  # uvicorn's default


@dataclass
class ServerOptions:
    """Everything `dllama api` takes on the command line."""

    model: str | None
    tokenizer: str | None
    backend: str
    gpu_index: int | None
    act: str
    kv_type: str
    n_threads: int | None
    max_seq_len: int | None
    workers: Sequence[str]
    net_timeout: float | None
    split: list[float] | str | None  # a cluster's shares: "auto"/None (by measured speed) or one per node
    temperature: float
    top_p: float
    seed: int | None
    chat_template: str | None
    host: str
    port: int
    queue_size: int = DEFAULT_QUEUE
    request_timeout: float = BODY_TIMEOUT  # seconds for a request's headers, and again for its body
    keep_alive: float = KEEP_ALIVE_S  # seconds an idle keep-alive connection is kept
    parallel: int | None = None  # requests decoded together (KV slots); None: 4 on one CPU node, else 1


def slot_count(opts: ServerOptions) -> int:
    """--parallel, or its default: 4 slots on a single CPU node, 1 on Vulkan and in a cluster."""
    if opts.parallel is not None:
        return opts.parallel
    return DEFAULT_PARALLEL if opts.backend == "cpu" and not opts.workers else 1


def _say(line: str) -> None:
    print(line, flush=True)


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, or a one-line DllamaError (port in use, bad address)."""
    if not 0 <= port <= 65535:
        raise DllamaError(f"--port {port} is out of range (0..65535)")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise DllamaError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def serve(opts: ServerOptions) -> None:
    """Serve until SIGTERM/SIGINT; a model that cannot be loaded (single node) ends it with a DllamaError."""
    if opts.chat_template is not None and opts.chat_template not in BUILTIN_TEMPLATES:
        raise DllamaError(
            f"unknown --chat-template {opts.chat_template!r} (built-in: {', '.join(BUILTIN_TEMPLATES)})"
        )
    if opts.queue_size < 0:
        raise DllamaError(f"--queue-size must be at least 0 (got {opts.queue_size})")
    for flag, seconds in (("--request-timeout", opts.request_timeout), ("--keep-alive", opts.keep_alive)):
        if not seconds > 0:
            raise DllamaError(f"{flag} must be above 0 seconds (got {seconds})")
    sock = bind(opts.host, opts.port)
    port = sock.getsockname()[1]
    fatal: list[str] = []
    server: uvicorn.Server | None = None

    def on_fatal(message: str) -> None:
        fatal.append(message)
        if server is not None:
            server.should_exit = True

    scheduler = Scheduler(
        _loader(opts),
        opts.queue_size,
        clustered=bool(opts.workers),
        on_fatal=on_fatal,
        template_name=opts.chat_template,
        log=_say,
    )
    app = create_app(scheduler, Defaults(opts.temperature, opts.top_p, opts.seed), opts.request_timeout)
    config = uvicorn.Config(
        app,
        http=bounded_protocol(opts.request_timeout),
        timeout_keep_alive=opts.keep_alive,  # typed int by uvicorn; a float works (it goes to call_later)
        log_level="info",
        timeout_graceful_shutdown=int(GRACE_S),
        server_header=False,
        lifespan="on",
    )
    server = uvicorn.Server(config)
    shown = f"[{opts.host}]" if ":" in opts.host else opts.host
    _say(f"Server URL: http://{shown}:{port}/v1/")
    # streams in flight finish like other requests (within GRACE_S) instead of being cut at once
    AppStatus.disable_automatic_graceful_drain()
    # uvicorn re-raises the signal that stopped it once it is done; after a graceful SIGTERM exit quietly
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        asyncio.run(_serve(server, scheduler, sock))
    finally:
        signal.signal(signal.SIGTERM, previous)
        sock.close()
    if fatal:
        raise DllamaError(fatal[0])


async def _serve(server: uvicorn.Server, scheduler: Scheduler, sock: socket.socket) -> None:
    """uvicorn plus a watcher that, as soon as shutdown begins, refuses the jobs still waiting."""

    async def watch() -> None:
        while not server.should_exit:
            await asyncio.sleep(0.1)
        scheduler.drain()

    watcher = asyncio.create_task(watch())
    try:
        await server.serve(sockets=[sock])
    finally:
        watcher.cancel()


def _loader(opts: ServerOptions) -> Callable[[], Loaded]:
    def load_model() -> Loaded:
        loaded = load(
            opts.model,
            opts.tokenizer,
            opts.backend,
            opts.act,
            opts.n_threads,
            opts.max_seq_len,
            opts.workers,
            opts.net_timeout,
            gpu_index=opts.gpu_index,
            split=opts.split,
            kv_type=opts.kv_type,
            n_slots=slot_count(opts),
        )
        runner = loaded.runner
        if runner.n_nodes == 1:  # compile the kernels now, not in the first request (a cluster already did)
            runner.forward([0] * min(runner.max_batch, runner.max_seq_len), 0, "last")
            runner.forward([0], 0, "last")
        cfg = loaded.model.config
        _say(
            f"💡 Model {cfg.arch}, dim {cfg.dim}, {cfg.n_layers} layers, vocab {cfg.vocab_size}; "
            f"backend {runner.backend.description}; buffers {opts.act}; KV cache {opts.kv_type}"
        )
        return loaded

    return load_model


def main() -> None:
    """The `dllama-api` console script: the same as `dllama api`."""
    from engine.cli import main as cli_main

    cli_main(["api", *sys.argv[1:]])
