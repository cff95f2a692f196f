"""Live `dllama-api` (and `dllama worker`) processes for tests, plus raw-HTTP helpers.

A server starts on port 0 in a subprocess whose output goes to a file (a full pipe would stall it); the
port is read from its "Server URL" line, readiness from GET /health. `stop()` always ends the process.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def api_command() -> list[str]:
    """The installed `dllama-api` console script (CI installs it), else `python -m engine.cli api`."""
    script = BIN / "dllama-api"
    return [str(script)] if script.exists() else [sys.executable, "-m", "engine.cli", "api"]


class Proc:
    """A subprocess with its output in a log file."""

    def __init__(self, argv: list[str], log: Path):
        self.log_path = log
        self._log = open(log, "wb")  # closed in stop()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_line(self, pattern: str, timeout: float) -> re.Match:
        """The first match of `pattern` in the log, waiting up to `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, self.log())
            if m:
                return m
            if self.proc.poll() is not None:
                code = self.proc.returncode
                raise AssertionError(f"process exited ({code}) before {pattern!r}:\n{self.log()}")
            time.sleep(0.1)
        raise AssertionError(f"no {pattern!r} within {timeout} s:\n{self.log()[-3000:]}")

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited within 20 s."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


class ApiServer(Proc):
    """`dllama-api --port 0 ARGS`: `url` is http://127.0.0.1:PORT (no /v1)."""

    def __init__(self, args: list[str], log: Path):
        super().__init__([*api_command(), "--port", "0", *args], log)
        m = self.wait_line(r"Server URL: (http://127\.0\.0\.1:(\d+))/v1/", 60)
        self.url, self.port = m.group(1), int(m.group(2))

    def health(self) -> httpx.Response:
        return httpx.get(self.url + "/health", timeout=10)

    def wait_health(self, status: int, timeout: float = 240) -> dict:
        """Poll /health until it answers `status`; its JSON."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"the server exited ({self.proc.returncode}):\n{self.log()}")
            try:
                last = self.health()
                if last.status_code == status:
                    return last.json()
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        got = last.text if last is not None else "no answer"
        raise AssertionError(f"/health never answered {status} in {timeout} s ({got}):\n{self.log()[-3000:]}")

    def post(self, path: str, body: dict, timeout: float = 120) -> httpx.Response:
        return httpx.post(self.url + path, json=body, timeout=timeout)


class Worker(Proc):
    """`dllama worker --port PORT` on loopback; `port` is the one it listens on."""

    def __init__(self, port: int, log: Path, args: tuple[str, ...] = ()):
        argv = [sys.executable, "-m", "engine.cli", "worker", "--host", "127.0.0.1", "--port", str(port)]
        super().__init__([*argv, *args], log)
        self.port = int(self.wait_line(r"Listening on 127\.0\.0\.1:(\d+)", 60).group(1))


def raw_http(port: int, data: bytes, timeout: float = 30) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes to the server, read until it closes; (status, headers, body). The socket is not
    half-closed: uvicorn takes that for a client that went away."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        while True:
            b = s.recv(65536)
            if not b:
                break
            chunks.append(b)
    raw = b"".join(chunks)
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    if headers.get("transfer-encoding") == "chunked":
        body = _unchunk(body)
    return status, headers, body


def _unchunk(body: bytes) -> bytes:
    out, i = [], 0
    while True:
        j = body.index(b"\r\n", i)
        n = int(body[i:j].split(b";")[0], 16)
        if n == 0:
            return b"".join(out)
        out.append(body[j + 2 : j + 2 + n])
        i = j + 2 + n + 2


def post_request(path: str, body: bytes, content_type: str | None = "application/json") -> bytes:
    """A raw HTTP/1.1 POST with Connection: close."""
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: {len(body)}\r\n"
    if content_type:
        head += f"Content-Type: {content_type}\r\n"
    return head.encode() + b"\r\n" + body


def sse_events(body: str) -> list[str]:
    """The `data:` payloads of an SSE body, in order."""
    return [line[len("data: ") :] for line in body.splitlines() if line.startswith("data: ")]


def chunks_json(body: str) -> tuple[list[dict], bool]:
    """The JSON chunks of an SSE body and whether it ended with data: [DONE]."""
    events = sse_events(body)
    done = bool(events) and events[-1] == "[DONE]"
    return [json.loads(e) for e in events if e != "[DONE]"], done
