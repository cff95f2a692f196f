"""Failure is never a hang: unreachable, silent, foreign, mismatched, killed and stopped peers end quickly
with a message naming the peer, and every surviving worker serves the next root."""

from __future__ import annotations

import json
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

import pytest
from netutil import TOKENS, assert_serves, root, session_config
from tinymodel import write_tiny_gguf

from engine.errors import DllamaError
from engine.model_file import open_model
from engine.runner import Runner
from engine.slicing import kv_cache_bytes, node_slice, slice_weights
from net.protocol import (
    GREETING,
    HEADER,
    MAGIC,
    PROTOCOL_VERSION,
    Msg,
    Role,
    pack_frame,
    pack_greeting,
)


@contextmanager
def fake_peer(behave: Callable[[socket.socket], None]) -> Iterator[str]:
    """A listening socket whose first connection is handled by `behave`; yields its address."""
    srv = socket.create_server(("127.0.0.1", 0))
    seen = threading.Event()

    def run() -> None:
        try:
            conn, _ = srv.accept()
        except OSError:
            return
        seen.set()
        with conn:
            conn.settimeout(5)
            try:
                behave(conn)
            except OSError:
                pass

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        yield f"127.0.0.1:{srv.getsockname()[1]}"
    finally:
        try:
            srv.shutdown(socket.SHUT_RDWR)  # wakes a pending accept()
        except OSError:
            pass
        srv.close()
        t.join(10)


def read_greeting(conn: socket.socket) -> bytes:
    head = conn.recv(GREETING.size, socket.MSG_WAITALL)
    return head + conn.recv(int.from_bytes(head[8:12], "little"), socket.MSG_WAITALL)


def raises_fast(fn: Callable[[], object], limit: float) -> str:
    """The DllamaError message of fn(), which must fail within `limit` seconds."""
    t0 = time.monotonic()
    with pytest.raises(DllamaError) as ei:
        fn()
    assert time.monotonic() - t0 < limit
    return str(ei.value)


# ---- the root meets a bad peer ----
def test_unreachable_worker(model, backend):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        addr = f"127.0.0.1:{s.getsockname()[1]}"
        msg = raises_fast(lambda: root(model, backend, [addr]), 2)
    assert f"cannot connect to worker 1 ({addr}): connection refused" in msg


def test_connect_timeout_names_the_address(model, backend):
    with socket.socket() as srv, socket.socket() as filler:
        srv.bind(("127.0.0.1", 0))
        srv.listen(0)
        filler.connect(srv.getsockname())  # the accept queue is full: further SYNs go unanswered
        addr = f"127.0.0.1:{srv.getsockname()[1]}"
        msg = raises_fast(lambda: root(model, backend, [addr], timeout=1.0), 4)
    assert f"cannot connect to worker 1 ({addr}): no answer within 1 s" in msg


def test_silent_peer(model, backend):
    with fake_peer(lambda c: time.sleep(1)) as addr:
        msg = raises_fast(lambda: root(model, backend, [addr], timeout=0.5), 2)
    assert f"worker 1 ({addr}) accepted the connection but sent no dllama greeting within 0.5 s" in msg


def test_non_dllama_peer(model, backend):
    def http(c: socket.socket) -> None:
        c.recv(4096)
        c.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        time.sleep(0.5)

    with fake_peer(http) as addr:
        msg = raises_fast(lambda: root(model, backend, [addr]), 3)
    assert "is not a dllama node (it sent b'HTTP/1.1 400'" in msg and addr in msg


def test_worker_of_another_protocol_version(model, backend):
    def newer(c: socket.socket) -> None:
        read_greeting(c)
        c.sendall(pack_greeting(Role.WORKER, {"device": "future"}, version=99))
        time.sleep(0.5)

    with fake_peer(newer) as addr:
        msg = raises_fast(lambda: root(model, backend, [addr]), 3)
    assert f"worker 1 ({addr}) speaks dllama protocol 99 but this node speaks {PROTOCOL_VERSION}" in msg


def test_oversize_message_from_a_worker(model, backend):
    def huge(c: socket.socket) -> None:
        read_greeting(c)
        c.sendall(pack_greeting(Role.WORKER, {}) + HEADER.pack(Msg.ERROR, 0, 0, 10**9))
        time.sleep(0.5)

    with fake_peer(huge) as addr:
        msg = raises_fast(lambda: root(model, backend, [addr]), 3)
    assert "sent a ERROR message of 1000000000 bytes, over its 4096-byte bound" in msg


def test_more_nodes_than_heads_fails_before_connecting(tmp_path, backend):
    small = open_model(write_tiny_gguf(tmp_path / "kv2.gguf", n_heads=4, n_kv_heads=2))
    connected = []
    with ExitStack() as stack:
        peers = [stack.enter_context(fake_peer(connected.append)) for _ in range(4)]
        msg = raises_fast(lambda: root(small, backend, peers), 2)
    assert "5 nodes cannot share a model with 4 attention heads: use at most 4 nodes" in msg
    assert connected == []


# ---- a worker meets a bad peer, then serves a real root ----
def talk(address: str, data: bytes, then: Callable[[socket.socket], None] | None = None) -> bytes:
    """Send `data` to a worker, optionally act on its reply, and return all it sends until it closes."""
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as c:
        c.sendall(data)
        if then is not None:
            then(c)
        out = b""
        while chunk := c.recv(65536):
            out += chunk
    return out


def error_text(reply: bytes) -> str:
    """The text of the ERROR frame that follows the worker's greeting in `reply`."""
    assert reply[:4] == MAGIC
    body = reply[GREETING.size + int.from_bytes(reply[8:12], "little") :]
    t, _, _, n = HEADER.unpack(body[: HEADER.size])
    assert t == Msg.ERROR
    return body[HEADER.size : HEADER.size + n].decode()


def test_garbage_bytes_to_a_worker(pool, model, backend):
    (w,) = pool.get(1)
    m = w.mark()
    reply = talk(w.address, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert "is not a dllama node (it sent b'GET / HTTP/1' instead of a dllama greeting)" in error_text(reply)
    w.wait_for(r"⚠️ Refused 127\.0\.0\.1:\d+: .* is not a dllama node", m)
    assert_serves(model, backend, [w])


def test_root_of_another_protocol_version(pool, model, backend):
    (w,) = pool.get(1)
    m = w.mark()
    reply = talk(w.address, pack_greeting(Role.ROOT, {"device": "future"}, version=99))
    assert int.from_bytes(reply[4:6], "little") == PROTOCOL_VERSION  # the worker still says its version
    assert f"speaks dllama protocol 99 but this node speaks {PROTOCOL_VERSION}" in error_text(reply)
    w.wait_for("⚠️ Refused .* speaks dllama protocol 99", m)
    assert_serves(model, backend, [w])


def test_oversize_message_to_a_worker(pool, model, backend):
    (w,) = pool.get(1)
    m = w.mark()

    def oversize(c: socket.socket) -> None:
        read_greeting(c)
        assert HEADER.unpack(c.recv(HEADER.size, socket.MSG_WAITALL))[0] == Msg.OK
        c.sendall(HEADER.pack(Msg.CONFIG, 0, 0, 1 << 30))

    reply = talk(w.address, pack_greeting(Role.ROOT, {}), oversize)
    t, _, _, n = HEADER.unpack(reply[: HEADER.size])
    assert t == Msg.ERROR
    assert "CONFIG message of 1073741824 bytes, over its 65536-byte bound" in reply[HEADER.size :].decode()
    w.wait_for("Session ended: .*CONFIG message of 1073741824 bytes", m)
    w.wait_for("Waiting for a root", m)
    assert_serves(model, backend, [w])


def test_worker_refuses_a_tensor_it_does_not_need(pool, model, backend):
    """The worker checks every tensor against the graph it rebuilt from the session config."""
    (w,) = pool.get(1)
    m = w.mark()
    header = {"name": "blk.0.attn_q.weight", "dtype": "f32", "shape": [7, 256]}

    def config_then_tensor(c: socket.socket) -> None:
        read_greeting(c)
        assert HEADER.unpack(c.recv(HEADER.size, socket.MSG_WAITALL))[0] == Msg.OK
        c.sendall(pack_frame(Msg.CONFIG, session_config(model)))
        assert HEADER.unpack(c.recv(HEADER.size, socket.MSG_WAITALL))[:2] == (Msg.OK, Msg.CONFIG)
        have = HEADER.unpack(c.recv(HEADER.size, socket.MSG_WAITALL))
        assert have[0] == Msg.HAVE and c.recv(have[3], socket.MSG_WAITALL) == b'{"have": []}'
        c.sendall(pack_frame(Msg.TENSOR, json.dumps(header).encode()))

    reply = talk(w.address, pack_greeting(Role.ROOT, {}), config_then_tensor)
    text = reply[HEADER.size :].decode()
    assert HEADER.unpack(reply[: HEADER.size])[0] == Msg.ERROR
    assert "sent tensor blk.0.attn_q.weight as 7x256; node 1 needs 128x256" in text  # 4 of 8 KV heads
    w.wait_for("Session ended: .*blk.0.attn_q.weight as 7x256", m)
    w.wait_for("Waiting for a root", m)
    assert_serves(model, backend, [w])


def test_worker_refuses_kv_slots_it_has_no_memory_for(pool, model, backend):
    """32 KV slots of 2^26 positions: 4.4 TB of node 1's cache (2 layers x K,V x 4 heads x 32 x f32 each),
    refused before any tensor arrives, saying what to lower."""
    (w,) = pool.get(1)
    m = w.mark()
    config = session_config(model, model_context_len=1 << 26, max_seq_len=1 << 26, max_batch=32, n_slots=32)

    def send_config(c: socket.socket) -> None:
        read_greeting(c)
        assert HEADER.unpack(c.recv(HEADER.size, socket.MSG_WAITALL))[0] == Msg.OK
        c.sendall(pack_frame(Msg.CONFIG, config))

    reply = talk(w.address, pack_greeting(Role.ROOT, {}), send_config)
    t, _, _, n = HEADER.unpack(reply[: HEADER.size])
    text = reply[HEADER.size : HEADER.size + n].decode()
    assert t == Msg.ERROR and "\n" not in text
    assert text.startswith("not enough memory for node 1: its slice, KV cache and buffers need ")
    assert text.endswith("GB are available (32 KV slots: lower --parallel or --max-seq-len)")
    w.wait_for("Session ended: not enough memory for node 1", m)
    w.wait_for("Waiting for a root", m)
    assert_serves(model, backend, [w])


def test_a_vulkan_worker_checks_kv_slots_against_device_memory(pool, model, backend, vulkan):
    """The same 4.4 TB of KV slots on a Vulkan worker: its host holds only the slice (the OK), and the
    program refuses the slots against device memory in one line once it compiles, naming --parallel."""
    (w,) = pool.get(1, backend="vulkan")
    m = w.mark()
    sl = node_slice(model.config, 1, 2)
    weights = {n: t for n, t in slice_weights(model, sl).items() if n != "token_embd.weight"}
    config = session_config(
        model,
        model_context_len=1 << 26,
        max_seq_len=1 << 26,
        max_batch=32,
        n_slots=32,
        weight_bytes=sum(t.nbytes for t in weights.values()),
    )

    def config_then_weights(c: socket.socket) -> None:
        read_greeting(c)
        assert HEADER.unpack(c.recv(HEADER.size, socket.MSG_WAITALL))[0] == Msg.OK
        c.sendall(pack_frame(Msg.CONFIG, config))
        assert HEADER.unpack(c.recv(HEADER.size, socket.MSG_WAITALL))[:2] == (Msg.OK, Msg.CONFIG)
        have = HEADER.unpack(c.recv(HEADER.size, socket.MSG_WAITALL))
        assert have[0] == Msg.HAVE and c.recv(have[3], socket.MSG_WAITALL) == b'{"have": []}'
        for name, t in weights.items():
            header = {"name": name, "dtype": t.dtype, "shape": list(t.shape)}
            c.sendall(pack_frame(Msg.TENSOR, json.dumps(header).encode()) + t.data.tobytes())
        c.sendall(pack_frame(Msg.WEIGHTS_DONE))

    reply = talk(w.address, pack_greeting(Role.ROOT, {}), config_then_weights)
    while HEADER.unpack(reply[: HEADER.size])[0] == Msg.PING:  # the keep-alive while it compiles
        reply = reply[HEADER.size :]
    t, _, _, n = HEADER.unpack(reply[: HEADER.size])
    text = reply[HEADER.size : HEADER.size + n].decode()
    assert t == Msg.ERROR and "\n" not in text
    need = int(re.match(r"the model needs (\d+) MiB of device memory but .* has \d+ MiB", text).group(1))
    assert need >= 32 * kv_cache_bytes(model.config, sl, 1 << 26) // 2**20  # every slot's rows
    assert text.endswith(": lower --parallel or --max-seq-len, use more nodes or the CPU")
    w.wait_for("Session ended: the model needs", m)
    w.wait_for("Waiting for a root", m)
    assert_serves(model, backend, [w])


def test_second_root_is_refused_while_one_is_served(pool, model, backend):
    (w,) = pool.get(1)
    first = root(model, backend, [w])
    try:
        msg = raises_fast(lambda: root(model, backend, [w]), 3)
        first.forward(TOKENS, 0)  # the first root is unaffected
    finally:
        first.close()
    assert f"worker 1 ({w.address}): refused: busy: this worker is serving the root at 127.0.0.1:" in msg
    assert_serves(model, backend, [w])


# ---- workers failing mid-generation ----
def generate_until_error(r: Runner, act: Callable[[], None]) -> tuple[str, float]:
    """Decode until the cluster fails; `act` runs in another thread 0.3 s in. (message, seconds after act)."""
    done_at = []

    def later() -> None:
        time.sleep(0.3)
        done_at.append(time.monotonic())
        act()

    th = threading.Thread(target=later)
    th.start()
    deadline = time.monotonic() + 30
    pos = 0
    try:
        with pytest.raises(DllamaError) as ei:
            while time.monotonic() < deadline:
                r.forward([5], pos % 60)
                pos += 1
    finally:
        th.join()
        r.close()
    return str(ei.value), time.monotonic() - done_at[0]


def test_worker_killed_mid_generation(pool, model, backend):
    w1, w2 = pool.get(2)
    m1 = w1.mark()
    msg, after = generate_until_error(root(model, backend, [w1, w2]), w2.proc.kill)
    assert after < 5
    assert f"worker 2 ({w2.address}) closed the connection" in msg and "during a forward pass" in msg
    w1.wait_for("Session ended", m1)
    w1.wait_for("Waiting for a root", m1)
    assert_serves(model, backend, [w1])


def test_worker_stopped_mid_generation(pool, model, backend):
    w1, w2 = pool.get(2)
    m1, m2 = w1.mark(), w2.mark()
    msg, after = generate_until_error(root(model, backend, [w1, w2]), lambda: w2.signal(signal.SIGSTOP))
    assert after < 5
    assert f"worker 2 ({w2.address}) sent nothing for 3 s" in msg and "--net-timeout" in msg
    w1.wait_for("Waiting for a root", m1)
    assert_serves(model, backend, [w1])
    w2.signal(signal.SIGCONT)  # once running again it notices the root is gone and waits for the next
    w2.wait_for("Session ended", m2)
    w2.wait_for("Waiting for a root", m2)
    assert_serves(model, backend, [w1, w2])
