"""`dllama api` / `dllama-api` start-up: its options, one-line errors (exit 2) for what a user can fix, and
signals."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import httpx
from apiserver import ROOT, ApiServer, api_command
from tinymodel import write_tiny_gguf


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
        "--parallel",
    ):
        assert option in r.stdout
    assert "127.0.0.1" in r.stdout and "9990" in r.stdout  # the defaults


def test_parallel_out_of_range_is_a_one_line_error():
    assert "0 is out of range: give 1 to 32" in _last_error(_run("--port", "0", "--parallel", "0"))


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


def test_health_is_503_while_loading_and_sigterm_still_stops_it(tmp_path):
    model = write_tiny_gguf(tmp_path / "tiny.gguf")
    with socket.socket() as silent:  # a "worker" that accepts and never greets: the load waits for it
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        worker = f"127.0.0.1:{silent.getsockname()[1]}"
        server = ApiServer(
            ["--model", str(model), "--workers", worker, "--net-timeout", "60"], tmp_path / "log"
        )
        try:
            conn, _ = silent.accept()
            h = server.health()
            assert h.status_code == 503 and h.json()["status"] == "loading"
            r = server.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]})
            assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable"
            assert httpx.get(server.url + "/v1/models", timeout=10).status_code == 503
            status = httpx.get(server.url + "/v1/cluster", timeout=10)
            assert status.status_code == 503 and status.json()["status"] == "loading"
            assert "nodes" not in status.json() and status.json()["slots"]["used"] == 0
            server.signal(signal.SIGTERM)
            conn.close()  # the load fails at once instead of waiting out --net-timeout
            assert server.proc.wait(30) == 0  # a graceful stop in the middle of loading
        finally:
            server.stop()


def test_ctrl_c_stops_the_server_gracefully_with_130(tmp_path):
    server = ApiServer(["--model", str(write_tiny_gguf(tmp_path / "tiny.gguf"))], tmp_path / "log")
    try:
        server.wait_health(200, 120)
        server.signal(signal.SIGINT)
        assert server.proc.wait(30) == 130
        assert "Shutting down" in server.log() and server.log().strip().splitlines()[-1] == "interrupted"
    finally:
        server.stop()
