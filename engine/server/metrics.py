"""GET /metrics in Prometheus' text format: requests by endpoint and status, the queue, the engine's slot and
its token counts.

Requests are counted by an ASGI middleware when their response starts (a stream counts as its 200; an error
inside a stream is in its body). Paths that are no route count as endpoint "other", so a scanner cannot
grow the label set.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from engine.server.scheduler import Scheduler

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
ENDPOINTS = (
    "/",
    "/health",
    "/metrics",
    "/v1/cluster",
    "/v1/models",
    "/v1/chat/completions",
    "/v1/completions",
)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def endpoint(path: str) -> str:
    """The endpoint label of a request path."""
    if path in ENDPOINTS:
        return path
    return "/v1/models/{model}" if path.startswith("/v1/models/") else "other"


class RequestCounter:
    """HTTP requests answered, by (endpoint, status); thread-safe."""

    def __init__(self) -> None:
        self._counts: Counter[tuple[str, int]] = Counter()
        self._lock = threading.Lock()

    def add(self, path: str, status: int) -> None:
        with self._lock:
            self._counts[(endpoint(path), status)] += 1

    def snapshot(self) -> dict[tuple[str, int], int]:
        with self._lock:
            return dict(self._counts)


class CountRequests:
    """ASGI middleware: every HTTP response's status goes to `counter`."""

    def __init__(self, app: ASGIApp, counter: RequestCounter):
        self.app, self.counter = app, counter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.counter.add(scope["path"], int(message["status"]))
            await send(message)

        await self.app(scope, receive, send_counted)


def render(requests: RequestCounter, scheduler: Scheduler) -> str:
    """The exposition text (Prometheus format 0.0.4)."""
    _, waiting = scheduler.load_counts()
    used, total = scheduler.slot_usage()
    stats = scheduler.stats()
    lines = [
        "# HELP dllama_requests_total HTTP requests answered, by endpoint and status.",
        "# TYPE dllama_requests_total counter",
    ]
    for (path, status), n in sorted(requests.snapshot().items()):
        lines.append(f'dllama_requests_total{{endpoint="{path}",status="{status}"}} {n}')
    gauges_and_counters = [
        ("queue_length", "gauge", "Requests waiting for the engine.", waiting),
        ("slots_used", "gauge", "KV slots generating now (one per choice).", used),
        ("slots_total", "gauge", "KV slots: choices decoded together (--parallel).", total),
        (
            "prompt_tokens_total",
            "counter",
            "Prompt tokens of generations run (cached ones too).",
            stats.prompt_tokens,
        ),
        (
            "prompt_tokens_reused_total",
            "counter",
            "Prompt tokens a KV slot already held, so not pre-filled again.",
            stats.reused_tokens,
        ),
        ("generated_tokens_total", "counter", "Tokens generated, all requests.", stats.generated_tokens),
        (
            "last_request_tokens_per_second",
            "gauge",
            "Decode rate of the last request: tokens after the first per second of wall clock.",
            stats.last_rate,
        ),
    ]
    for name, kind, help_text, value in gauges_and_counters:
        lines += [
            f"# HELP dllama_{name} {help_text}",
            f"# TYPE dllama_{name} {kind}",
            f"dllama_{name} {value}",
        ]
    return "\n".join(lines) + "\n"
