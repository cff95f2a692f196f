"""`dllama api` / `dllama-api` start-up: its options, and one-line errors (exit 2) for what a user can fix."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import httpx
from apiserver import ROOT, ApiServer, api_command


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(
        [*api_command(), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env
    )


def _last_error(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr
    return r.stderr.strip().splitlines()[-1]


def test_help_lists_the_options():
    r = _run("--help")
    assert r.returncode == 0
    for option in (
        "--host",
        "--port",
        "--workers",
        "--model",
        "--temperature",
        "--topp",
        "--seed",
        "--queue-size",
    ):
        assert option in r.stdout
    assert "127.0.0.1" in r.stdout and "9990" in r.stdout  # the defaults


def test_port_in_use():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        line = _last_error(_run("--port", str(port)))
    assert line.startswith("error: cannot listen on 127.0.0.1:") and str(port) in line


def test_missing_model_file(tmp_path):
    missing = tmp_path / "nope.gguf"
    r = _run("--port", "0", "--model", str(missing))
    assert "Server URL: http://127.0.0.1:" in r.stdout
    line = _last_error(r)
    assert line.startswith("error: ") and str(missing) in line


def test_unknown_chat_template():
    line = _last_error(_run("--port", "0", "--chat-template", "nope"))
    assert "nope" in line and "chatml" in line


def test_dllama_api_is_dllama_api_subcommand():
    r = subprocess.run(
        [sys.executable, "-m", "engine.cli", "api", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0 and "--queue-size" in r.stdout


def test_health_is_503_while_loading(tmp_path):
    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)  # opening it blocks until a writer comes: the server stays in "loading" meanwhile
    server = ApiServer(["--model", str(fifo)], tmp_path / "server.log")
    try:
        h = server.health()
        assert h.status_code == 503 and h.json()["status"] == "loading"
        r = server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]})
        assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable"
        assert httpx.get(server.url + "/v1/models", timeout=10).status_code == 503
        with open(fifo, "wb") as f:
            f.write(b"junk")
        assert server.proc.wait(60) == 2  # a model that cannot be loaded ends the server (single node)
        assert f"error: {fifo}: unknown file format" in server.log()
    finally:
        server.stop()
