"""Slow and idle clients on raw sockets: a connection that sends nothing, trickles its headers or its body, or
idles after a response is closed (or answered 408) within the bounds `--request-timeout` and `--keep-alive`
set, while a client within them is served."""

from __future__ import annotations

import socket
import time

import pytest
from apiserver import ApiServer, post_request, raw_http

REQUEST_TIMEOUT = 3.0
KEEP_ALIVE = 1.0
SLACK = 2.0  # seconds a loaded test machine may add to a deadline
HEALTH = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.fixture(scope="module")
def strict(tmp_path_factory):
    args = ["--request-timeout", str(REQUEST_TIMEOUT), "--keep-alive", str(KEEP_ALIVE)]
    server = ApiServer(args, tmp_path_factory.mktemp("limits") / "server.log")
    try:
        server.wait_health(200)
        yield server
    finally:
        server.stop()


def until_closed(sock: socket.socket, trickle: bytes = b"", every: float = 0.5) -> tuple[float, bytes]:
    """Send `trickle` one byte every `every` s until the server closes the connection; (seconds from now to
    the close, what the server sent). Fails if it stays open for REQUEST_TIMEOUT + SLACK + 5 s."""
    t0, got, i = time.monotonic(), b"", 0
    sock.settimeout(every)
    while time.monotonic() - t0 < REQUEST_TIMEOUT + SLACK + 5:
        if i < len(trickle):
            try:
                sock.send(trickle[i : i + 1])
            except (BrokenPipeError, ConnectionResetError):
                return time.monotonic() - t0, got
            i += 1
        try:
            data = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return time.monotonic() - t0, got
        if not data:
            return time.monotonic() - t0, got
        got += data
    raise AssertionError(f"the server kept the connection open (sent {got[:200]!r})")


def read_response(sock: socket.socket) -> bytes:
    """One complete response with a Content-Length body, the connection left open."""
    sock.settimeout(10)
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(v)
        for k, _, v in (ln.partition(b":") for ln in head.split(b"\r\n"))
        if k.lower() == b"content-length"
    )
    while len(body) < length:
        body += sock.recv(65536)
    return head


def connect(server: ApiServer) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=10)


def test_silent_connection_is_closed(strict):
    with connect(strict) as s:
        took, got = until_closed(s)
    assert got == b""
    assert REQUEST_TIMEOUT - 0.3 <= took <= REQUEST_TIMEOUT + SLACK


def test_headers_one_byte_at_a_time_are_cut_off(strict):
    trickle = HEALTH[:-2] + b"X-Pad: " + b"a" * 200 + b"\r\n\r\n"  # 120 s at two bytes a second
    with connect(strict) as s:
        took, got = until_closed(s, trickle)
    assert got == b""
    assert took <= REQUEST_TIMEOUT + SLACK


def test_slow_headers_after_a_first_request_are_cut_off_too(strict):
    with connect(strict) as s:
        s.sendall(HEALTH)
        assert read_response(s).startswith(b"HTTP/1.1 200")
        took, got = until_closed(s, HEALTH[:-2] + b"X-Pad: " + b"a" * 200 + b"\r\n\r\n")
    assert got == b""
    assert took <= REQUEST_TIMEOUT + SLACK


def test_idle_keep_alive_connection_is_closed(strict):
    with connect(strict) as s:
        s.sendall(HEALTH)
        assert read_response(s).startswith(b"HTTP/1.1 200")
        took, got = until_closed(s)
    assert got == b""
    assert took < REQUEST_TIMEOUT - 0.5  # the keep-alive bound, not the request one, closed it


def test_slow_body_gets_408(strict):
    body = b'{"messages": [{"role": "user", "content": "' + b"a" * 200 + b'"}], "max_tokens": 1}'
    head = post_request("/v1/chat/completions", body)[: -len(body)]
    with connect(strict) as s:
        s.sendall(head)
        took, got = until_closed(s, body)
    assert got.startswith(b"HTTP/1.1 408"), got[:200]
    assert b"--request-timeout" in got
    assert took <= REQUEST_TIMEOUT + SLACK


def test_a_client_within_the_bounds_is_served(strict):
    request = post_request(
        "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}'
    )
    with connect(strict) as s:
        for i in range(0, len(request), len(request) // 4 + 1):
            s.sendall(request[i : i + len(request) // 4 + 1])
            time.sleep(0.4)
        took, got = until_closed(s)
    assert got.startswith(b"HTTP/1.1 200"), got[:200]
    status, _, _ = raw_http(strict.port, HEALTH[:-2] + b"Connection: close\r\n\r\n")
    assert status == 200
