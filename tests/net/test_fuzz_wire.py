"""Wire fuzzing, seeded and bounded: live workers meet malformed, truncated, oversized, nested, trickled,
silent and hung-up peers; a real root meets fake workers that misbehave at every set-up step and in a
forward pass. Each case ends within its bound with one refusal line (the root: one DllamaError line, or the
CLI exit 2), never a traceback, and the workers serve a real root afterwards.

The slow cases (the 10 s greeting bound, the 30 s set-up silence) run in the background from the start,
while the quick ones run one after another; the last test collects them.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import resource
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import pytest
from netutil import ROOT, TOKENS, WorkerProc, assert_serves, root, session_config

from engine.errors import DllamaError
from net.protocol import GREETING, HEADER, MAGIC, PROTOCOL_VERSION, Msg, Role

SEED = 10
TIMEOUT = 1.0  # --net-timeout of the roots here
TRICKLE = 0.3  # seconds between trickled bytes: never silent for TIMEOUT, yet far below the minimum rate
GREETING_BOUND = 10.0 + 3.0  # the worker's greeting wait, with slack for a loaded machine
SETUP_BOUND = 30.0 + 12.0  # the 30 s set-up silence, with CLI start-up and slack
QUICK_BOUND = 6.0  # any other case
BAD_TEXT = b"out of memory\nTraceback (most recent call last):\n  \x1b[31mboom"  # a peer's ERROR text


def head(
    version: int = PROTOCOL_VERSION, role: int = Role.ROOT, length: int = 0, magic: bytes = MAGIC
) -> bytes:
    """A greeting head with any field, built by hand (the spec's layout, not pack_greeting)."""
    return struct.pack("<4sHBBI", magic, version, role, 0, length)


def greeting(role: int = Role.ROOT, payload: bytes = b'{"device":"fuzz"}', **kw) -> bytes:
    return head(role=role, length=len(payload), **kw) + payload


def frame(t: int, payload: bytes = b"", a: int = 0, b: int = 0, length: int | None = None) -> bytes:
    return struct.pack("<BBHI", t, a, b, len(payload) if length is None else length) + payload


def recv_exact(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise ConnectionError(f"closed after {len(out)} of {n} bytes")
        out += chunk
    return out


def read_greeting(sock: socket.socket) -> bytes:
    h = recv_exact(sock, GREETING.size)
    return h + recv_exact(sock, int.from_bytes(h[8:12], "little"))


def read_frame(sock: socket.socket) -> tuple[int, int, int, bytes]:
    """The next frame other than PING: (type, a, b, payload); FORWARD carries no payload."""
    while True:
        t, a, b, c = HEADER.unpack(recv_exact(sock, HEADER.size))
        payload = b"" if t == Msg.FORWARD else recv_exact(sock, c)
        if t != Msg.PING:
            return t, a, b, payload


def until_closed(sock: socket.socket, bound: float) -> bytes:
    """Everything the other end sends until it closes; fails if it keeps the connection open past `bound`."""
    out, end = b"", time.monotonic() + bound
    while (left := end - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            chunk = sock.recv(1 << 16)
        except TimeoutError:
            break
        except OSError:  # reset
            return out
        if not chunk:
            return out
        out += chunk
    raise AssertionError(f"the connection was still open after {bound} s")


def error_texts(reply: bytes) -> list[str]:
    """The texts of the ERROR frames in a worker's reply (after its greeting, if it starts with one)."""
    if reply[:4] == MAGIC:
        reply = reply[GREETING.size + int.from_bytes(reply[8:12], "little") :]
    texts = []
    while len(reply) >= HEADER.size:
        t, _, _, c = HEADER.unpack(reply[: HEADER.size])
        body, reply = reply[HEADER.size : HEADER.size + c], reply[HEADER.size + c :]
        if t == Msg.ERROR:
            texts.append(body.decode(errors="replace"))
    return texts


def assert_one_line(text: str) -> None:
    assert "\n" not in text and "\r" not in text and "\x1b" not in text, repr(text)


@pytest.fixture(scope="module")
def workers():
    """Worker A takes the quick cases one after another, B and C the slow ones in the background."""
    ws = [WorkerProc() for _ in range(3)]
    yield ws
    for w in ws:
        w.close()


# ---- a fake worker that a real root connects to ----
class FakeWorker:
    """Plays a worker (of the f32 tiny model) for one root until `step`, then misbehaves as `how` says:
    silence, hangup, reset, trickle (the right answer, one byte per `trickle` s), pings, garbage, error,
    wrong (an OK for another message), truncated (half the answer, then hang up) or raw bytes to send."""

    STEPS = ("greeting", "ok", "config", "weights", "compile", "mesh", "forward")

    def __init__(self, step: str, how: str | bytes, seed: int = SEED, trickle: float = TRICKLE):
        assert step in self.STEPS
        self.step, self.how, self.trickle = step, how, trickle
        self.rng = random.Random(seed)
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.srv.getsockname()[1]}"
        self.accepted = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def close(self) -> None:
        try:
            self.srv.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.srv.close()
        self.thread.join(SETUP_BOUND)

    def _run(self) -> None:
        try:
            conn, _ = self.srv.accept()
        except OSError:
            return
        self.accepted.set()
        with conn:
            conn.settimeout(SETUP_BOUND + 20)
            try:
                self._play(conn)
            except OSError:
                pass

    def _play(self, conn: socket.socket) -> None:
        read_greeting(conn)
        answer = greeting(Role.WORKER, b'{"device":"fake"}')
        if self.step == "greeting":
            return self._misbehave(conn, answer)
        conn.sendall(answer)
        if self.step == "ok":
            return self._misbehave(conn, frame(Msg.OK, a=Msg.OK))
        conn.sendall(frame(Msg.OK, a=Msg.OK))
        assert read_frame(conn)[0] == Msg.CONFIG
        answer = frame(Msg.OK, a=Msg.CONFIG) + frame(Msg.HAVE, b'{"have":[]}')  # an empty slice cache
        if self.step == "config":
            return self._misbehave(conn, answer)
        conn.sendall(answer)
        while (f := read_frame(conn))[0] != Msg.WEIGHTS_DONE:
            shape = json.loads(f[3])["shape"]
            if self.step == "weights":
                return self._misbehave(conn, b"")
            recv_exact(conn, 4 * math.prod(shape))  # f32 values
        if self.step == "compile":
            return self._misbehave(conn, frame(Msg.OK, a=Msg.WEIGHTS_DONE))
        conn.sendall(frame(Msg.OK, a=Msg.WEIGHTS_DONE))
        assert read_frame(conn)[0] == Msg.MESH
        if self.step == "mesh":
            return self._misbehave(conn, frame(Msg.OK, a=Msg.MESH))
        conn.sendall(frame(Msg.OK, a=Msg.MESH))
        t, _, rows, _ = read_frame(conn)
        assert t == Msg.FORWARD
        return self._misbehave(conn, bytes(rows * 256 * 4))  # this node's f32 partial sums, dim 256

    def _misbehave(self, conn: socket.socket, answer: bytes) -> None:
        how = self.how
        if how == "hangup":
            return
        if how == "reset":
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return
        if how == "truncated":
            conn.sendall(answer[: len(answer) // 2])
            return
        if how == "trickle":
            for i in range(len(answer)):
                time.sleep(self.trickle)
                conn.sendall(answer[i : i + 1])
        elif how == "pings":
            conn.setblocking(False)
            end = time.monotonic() + SETUP_BOUND
            while time.monotonic() < end:
                try:
                    conn.send(frame(Msg.PING))
                    if not conn.recv(1 << 16):
                        return
                except BlockingIOError:
                    pass
                time.sleep(0.05)
            return
        elif how == "garbage":
            conn.sendall(bytes([200]) + self.rng.randbytes(63))  # type 200 is no message type
        elif how == "error":
            conn.sendall(frame(Msg.ERROR, BAD_TEXT))
        elif how == "wrong":
            conn.sendall(frame(Msg.OK, a=Msg.STOP))
        elif isinstance(how, bytes):
            conn.sendall(how)
        else:
            assert how == "silence", how
        until_closed(conn, SETUP_BOUND + 10)  # read (and drop) whatever the root still sends


def run_root(model, backend, address: str) -> str:
    """Set up a root on `address` and run a forward pass; the DllamaError it must end with."""
    with pytest.raises(DllamaError) as ei:
        r = root(model, backend, [address], timeout=TIMEOUT)
        try:
            r.forward(TOKENS, 0)
        finally:
            r.close()
    return str(ei.value)


RX_WORKER = r"worker 1 \(127\.0\.0\.1:\d+\)"

ROOT_CASES = [  # (step, how, what the root's one line must match)
    ("greeting", "hangup", "closed the connection during the greeting: is it a dllama worker"),
    ("greeting", "reset", "closed the connection"),
    ("greeting", "trickle", r"sent \d of 12 bytes in 1\.\d s \(trickling.* during the greeting"),
    ("greeting", "garbage", r"is not a dllama node \(it sent b.\\xc8"),
    ("greeting", "truncated", "closed the connection during the greeting"),
    ("greeting", greeting(Role.WORKER, version=65535), "speaks dllama protocol 65535 but this node speaks"),
    ("greeting", greeting(Role.ROOT), "answered as a root, not as a worker"),
    ("greeting", greeting(77), "answered as a node of role 77, not as a worker"),
    (
        "greeting",
        head(role=Role.WORKER, length=5000),
        "sent a greeting of 5000 bytes, over the 4096-byte bound",
    ),
    ("greeting", greeting(Role.WORKER, b"[" * 4000), "sent a greeting nested 4000 levels deep"),
    (
        "greeting",
        greeting(Role.WORKER, b'{"m":' + b"9" * 4000 + b"}"),
        "greeting with an integer of 4000 digits",
    ),
    ("greeting", greeting(Role.WORKER, b'{"memory":NaN}'), "greeting with the number NaN"),
    ("greeting", greeting(Role.WORKER, b"[1,2]"), "sent a greeting that is not a JSON object"),
    ("greeting", greeting(Role.WORKER, b"\xff" * 20), "sent a greeting that is not a JSON object"),
    ("greeting", greeting(Role.WORKER)[:20], r"sent nothing for 1 s .* during the greeting"),
    ("ok", "silence", r"sent nothing for 1 s \(stalled, stopped or overloaded\) during the greeting"),
    ("ok", "hangup", "closed the connection during the greeting"),
    ("ok", "trickle", r"sent \d of 8 bytes in 1\.\d s .* during the greeting"),
    ("ok", "pings", r"gave no answer within 1 s \(only keep-alives\) during the greeting"),
    ("ok", "garbage", "sent an unknown message type 200"),
    ("ok", "error", "out of memory Traceback"),
    ("ok", "wrong", "sent OK \\(a=9\\) where OK was expected"),
    ("ok", frame(Msg.ERROR, length=5000), "ERROR message of 5000 bytes, over its 4096-byte bound"),
    ("config", "hangup", "closed the connection.* while the root sent it the session config"),
    ("config", "error", "out of memory Traceback"),
    ("config", "garbage", "sent an unknown message type 200"),
    ("config", "wrong", "sent OK \\(a=9\\) where OK was expected"),
    ("config", "truncated", "closed the connection.* while the root sent it the session config"),
    (
        "config",
        frame(Msg.OK, a=Msg.CONFIG) + frame(Msg.HAVE, b'{"have":["blk.0.attn_q.weight","evil"]}'),
        "listed cached tensors that its slice does not hold",
    ),
    ("config", frame(Msg.OK, a=Msg.CONFIG) + frame(Msg.HAVE, b'{"have":7}'), "listed cached tensors that"),
    (
        "config",
        frame(Msg.OK, a=Msg.CONFIG) + frame(Msg.HAVE, b"[" * 300),
        "sent a list of cached tensors nested 300 levels deep",
    ),
    ("config", frame(Msg.OK, a=Msg.CONFIG) + frame(Msg.MESH), "sent MESH \\(a=0\\) where HAVE was expected"),
    ("weights", "hangup", "closed the connection"),
    ("weights", "error", "out of memory Traceback"),
    ("compile", "hangup", "closed the connection while the root waited for it to compile its slice"),
    ("compile", "error", "out of memory Traceback"),
    ("compile", "garbage", "sent an unknown message type 200"),
    ("compile", "wrong", "sent OK \\(a=9\\) where OK was expected"),
    (
        "compile",
        "pings",
        r"gave no answer within 2 s \(only keep-alives\) while the root waited for it to compile",
    ),
    ("mesh", "hangup", "closed the connection while the root waited for it to build the mesh"),
    ("mesh", "error", "out of memory Traceback"),
    ("forward", "silence", r"sent nothing for 1 s \(stalled.* during a forward pass: raise --net-timeout"),
    ("forward", "trickle", r"sent \d of 4096 bytes in 1\.\d s \(trickling.* during a forward pass"),
    ("forward", "hangup", "closed the connection.* during a forward pass: it crashed"),
    ("forward", "truncated", "closed the connection.* during a forward pass"),
    # raw rows carry no framing: random bytes of the right size pass as numbers, then the next sync waits
    ("forward", random.Random(SEED).randbytes(4 * 256 * 4), r"sent nothing for 1 s .* during a forward pass"),
]


def case_id(case) -> str:
    step, how, _ = case
    return f"{step}-{how if isinstance(how, str) else 'bytes' + str(ROOT_CASES.index(case))}"


# ---- the slow cases, started first and collected by the last test ----
def cli_root(model_path: str, address: str) -> tuple[subprocess.CompletedProcess, float]:
    """`dllama inference` on one worker with --net-timeout 1, under a 4 GiB address-space cap."""

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))

    args = ["inference", "--model", model_path, "--prompt", "hello", "--steps", "2", "--nthreads", "1"]
    t0 = time.monotonic()
    p = subprocess.run(
        [sys.executable, "-m", "engine.cli", *args, "--workers", address, "--net-timeout", str(TIMEOUT)],
        cwd=ROOT,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
        capture_output=True,
        text=True,
        timeout=SETUP_BOUND + 30,
        preexec_fn=cap,
    )
    return p, time.monotonic() - t0


CLI_CASES = [  # (step, how, trickle interval, what the one line on stderr must match, bound)
    ("greeting", "garbage", TRICKLE, "is not a dllama node", QUICK_BOUND + 10),
    ("forward", "trickle", TRICKLE, r"sent \d of \d+ bytes in 1\.\d s \(trickling", QUICK_BOUND + 10),
    (
        "config",
        "silence",
        TRICKLE,
        r"sent nothing for 30 s .* while the root sent it the session config",
        SETUP_BOUND,
    ),
    (
        "config",
        "trickle",
        5.0,
        r"sent \d of 8 bytes in 30\.\d s .* while the root sent it the session config",
        SETUP_BOUND,
    ),
    ("config", "pings", TRICKLE, r"gave no answer within 30 s \(only keep-alives\)", SETUP_BOUND),
    (
        "compile",
        "silence",
        TRICKLE,
        r"sent nothing for 30 s .* while the root waited for it to compile",
        SETUP_BOUND,
    ),
    (
        "mesh",
        "silence",
        TRICKLE,
        r"sent nothing for 30 s .* while the root waited for it to build the mesh",
        SETUP_BOUND,
    ),
]


def silent_greeting(address: str, data: bytes, every: float) -> tuple[float, bytes]:
    """Connect and send `data` one byte per `every` s (all at once if 0), then nothing; (seconds until the
    worker closed the connection, what it sent)."""
    host, port = address.rsplit(":", 1)
    t0 = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=5) as c:
        reply = b""
        for i in range(len(data) if every else 0):
            if select.select([c], [], [], every)[0]:  # it answered or closed: stop trickling
                break
            c.sendall(data[i : i + 1])
        if not every:
            c.sendall(data)
        reply += until_closed(c, GREETING_BOUND + 5)
    return time.monotonic() - t0, reply


def stalled_session(address: str, then: Callable[[socket.socket], None]) -> float:
    """Greet a worker as a root, run `then`, and wait for the worker to end the session; its seconds."""
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as c:
        c.sendall(greeting(Role.ROOT))
        read_greeting(c)
        assert read_frame(c)[:2] == (Msg.OK, Msg.OK)
        t0 = time.monotonic()
        then(c)
        until_closed(c, SETUP_BOUND)
    return time.monotonic() - t0


@pytest.fixture(scope="module")
def background(workers, tiny8_paths):
    """Start every slow case at once; yields {name: Future}."""
    _, b, c = workers
    pool = ThreadPoolExecutor(max_workers=32)
    futures: dict[str, Future] = {}
    fakes = []
    for step, how, every, _, _ in CLI_CASES:
        fake = FakeWorker(step, how, trickle=every)
        fakes.append(fake)
        futures[f"cli-{step}-{how}"] = pool.submit(cli_root, str(tiny8_paths["f32"]), fake.address)
    # worker B: a root that greets and then says nothing; worker C: a CONFIG whose payload trickles
    futures["session-silence"] = pool.submit(stalled_session, b.address, lambda s: None)
    cfg = frame(Msg.CONFIG, b'{"session":"x"}' + b" " * 985)

    def trickled_config(s: socket.socket) -> None:
        s.sendall(cfg[:9])
        for i in range(9, 30):  # one byte per 2 s: never silent for 30 s, but 1000 bytes would need 33 min
            if select.select([s], [], [], 2.0)[0]:  # it gave up (its ERROR frame or the close)
                return
            s.sendall(cfg[i : i + 1])

    futures["session-trickle"] = pool.submit(stalled_session, c.address, trickled_config)
    # worker C's greeting threads: silence, the 1 byte per 3 s, a trickled payload, and a flood
    futures["greeting-silence"] = pool.submit(silent_greeting, c.address, b"", 0)
    futures["greeting-trickle-3s"] = pool.submit(silent_greeting, c.address, greeting(Role.ROOT), 3.0)
    futures["greeting-trickle-payload"] = pool.submit(
        silent_greeting, c.address, greeting(Role.ROOT, b'{"device":"' + b"x" * 300 + b'"}'), 0.4
    )
    time.sleep(0.5)
    for i in range(20):
        futures[f"flood-{i}"] = pool.submit(silent_greeting, c.address, head()[:5], 0)
    for fake in fakes:  # the CLI roots have started (their start-up is the busy part): quick cases may run
        fake.accepted.wait(60)
    yield futures
    pool.shutdown(wait=True, cancel_futures=False)
    for fake in fakes:
        fake.close()


def test_background_cases_started(background):
    assert len(background) == len(CLI_CASES) + 2 + 3 + 20


# ---- the root meets a fake worker (in-process, one after another) ----
@pytest.mark.parametrize("case", ROOT_CASES, ids=case_id)
def test_root_meets_a_bad_worker(case, model, backend, monkeypatch):
    step, how, want = case
    if how == "pings":
        monkeypatch.setattr("net.root.compile_wait", lambda timeout: 2.0)  # the real one is 300 s
    fake = FakeWorker(step, how)
    t0 = time.monotonic()
    try:
        msg = run_root(model, backend, fake.address)
    finally:
        fake.close()
    assert time.monotonic() - t0 < QUICK_BOUND
    assert_one_line(msg)
    assert re.search(RX_WORKER, msg), msg
    assert re.search(want, msg), msg


# ---- a live worker meets a bad peer ----
def as_root(c: socket.socket) -> None:
    c.sendall(greeting(Role.ROOT))
    read_greeting(c)
    f = read_frame(c)
    assert f[:2] == (Msg.OK, Msg.OK), f


def configured(payload_fn: Callable[[object], bytes]) -> Callable:
    """As a root, send the session config `payload_fn(model)` and read its OK."""

    def act(c: socket.socket, model) -> None:
        as_root(c)
        c.sendall(frame(Msg.CONFIG, payload_fn(model)))
        assert read_frame(c)[:2] == (Msg.OK, Msg.CONFIG)
        assert read_frame(c)[0] == Msg.HAVE

    return act


def tensor(name, dtype="f32", shape=(128, 256)) -> bytes:
    return frame(Msg.TENSOR, json.dumps({"name": name, "dtype": dtype, "shape": shape}).encode())


RNG = random.Random(SEED)
RANDOM = [RNG.randbytes(RNG.randint(12, 4000)) for _ in range(8)]
Q = "blk.0.attn_q.weight"  # node 1 of 2 needs it as 128x256 (4 of 8 KV heads, head_dim 32)
# node 1 of 2 of the tiny model: KV (and query) heads 4..8 of 8, FFN rows 160..320, vocabulary 144..288
SLICE = dict(node=1, n_nodes=2, kv_heads=[4, 8], q_heads=[4, 8], ffn=[160, 320], moe=[0, 0], vocab=[144, 288])

# (name, before: None | as_root | configured(...), bytes to send, then "shut" | "close" | "reset",
#  the ERROR text the worker must reply with (None: it only closes), its log line)
WORKER_CASES = [
    *[
        (f"random-{i}", None, data, "shut", "is not a dllama node (it sent b", r"Refused .*not a dllama node")
        for i, data in enumerate(RANDOM)
    ],
    (
        "ssh",
        None,
        b"SSH-2.0-OpenSSH_9.6\r\n",
        "shut",
        "is not a dllama node (it sent b'SSH-2.0",
        "not a dllama",
    ),
    (
        "version-65535",
        None,
        greeting(version=65535),
        "shut",
        "speaks dllama protocol 65535",
        "protocol 65535",
    ),
    ("role-0", None, greeting(0), "shut", "greeted as role 0", "greeted as role 0"),
    ("role-worker", None, greeting(Role.WORKER), "shut", "greeted as role 2", "greeted as role 2"),
    (
        "length-4097",
        None,
        head(length=4097),
        "shut",
        "greeting of 4097 bytes, over the 4096-byte",
        "4097 bytes",
    ),
    ("length-max", None, head(length=2**32 - 1), "shut", "greeting of 4294967295 bytes", "4294967295"),
    ("nested", None, greeting(payload=b"[" * 4090), "shut", "nested 4090 levels deep", "nested 4090"),
    ("nested-object", None, greeting(payload=b'{"a":' * 800), "shut", "nested 800 levels deep", "nested 800"),
    (
        "bigint",
        None,
        greeting(payload=b'{"m":' + b"1" * 4000 + b"}"),
        "shut",
        "integer of 4000 digits",
        "4000",
    ),
    ("nan", None, greeting(payload=b'{"memory":NaN}'), "shut", "with the number NaN", "NaN"),
    ("huge-float", None, greeting(payload=b'{"m":1e400}'), "shut", "with the number 1e400", "1e400"),
    ("array", None, greeting(payload=b"[]"), "shut", "greeting that is not a JSON object", "not a JSON"),
    ("not-utf8", None, greeting(payload=b"\xc3\x28\xa0\xa1"), "shut", "not a JSON object", "not a JSON"),
    (
        "peer-stranger",
        None,
        greeting(Role.PEER, b'{"session":"nope","node":1}'),
        "shut",
        "no session",
        "no session",
    ),
    (
        "peer-bool-node",
        None,
        greeting(Role.PEER, b'{"session":null,"node":true}'),
        "shut",
        "no session",
        "session",
    ),
    (
        "hangup-in-head",
        None,
        head()[:5],
        "close",
        None,
        r"ended during its greeting: it closed the connection",
    ),
    ("hangup-in-payload", None, greeting()[:15], "close", None, r"ended during its greeting: it closed"),
    ("reset-in-head", None, head()[:7], "reset", None, r"Connection from .* ended during its greeting"),
    ("nothing", None, b"", "close", None, r"ended during its greeting: it closed the connection"),
    ("config-nested", as_root, frame(Msg.CONFIG, b"[" * 60000), "shut", "nested 60000 levels deep", "60000"),
    (
        "config-bigint",
        as_root,
        frame(Msg.CONFIG, b'{"n":' + b"7" * 5000 + b"}"),
        "shut",
        "5000 digits",
        "5000",
    ),
    ("config-garbage", as_root, frame(Msg.CONFIG, RANDOM[0][:900]), "shut", "not a JSON object", "JSON"),
    (
        "config-fields",
        as_root,
        frame(Msg.CONFIG, b'{"session":"x"}'),
        "shut",
        "incomplete session",
        "incomplete",
    ),
    ("unknown-type", as_root, frame(200), "shut", "unknown message type 200", "type 200"),
    ("ping-payload", as_root, frame(Msg.PING, length=5), "shut", "PING message of 5 bytes", "PING message"),
    ("forward-first", as_root, frame(Msg.FORWARD, a=1, b=1), "shut", "FORWARD where CONFIG was", "FORWARD"),
    (
        "forward-rows-first",
        as_root,
        frame(Msg.FORWARD_ROWS, bytes(8), a=2, b=1),
        "shut",
        "FORWARD_ROWS where CONFIG was",
        "FORWARD_ROWS",
    ),
    (
        "forward-rows-huge",
        as_root,
        frame(Msg.FORWARD_ROWS, length=2**32 - 1),
        "shut",
        "FORWARD_ROWS message of 4294967295 bytes, over its 524280-byte bound",
        "FORWARD_ROWS message",
    ),
    ("error-first", as_root, frame(Msg.ERROR, BAD_TEXT), "shut", "sent ERROR where CONFIG", "ERROR where"),
    (
        "config-cut",
        as_root,
        frame(Msg.CONFIG, length=500) + b"{" * 10,
        "close",
        None,
        "closed the connection",
    ),
    ("hangup-after-ok", as_root, b"", "close", None, "Session ended: the root .* closed the connection"),
    ("stop-first", as_root, frame(Msg.STOP), "shut", None, "🛑 Stop"),
]
MODEL_CASES = [  # session configs whose JSON is fine but whose values are not
    ("layers-huge", dict(model_n_layers=10**9), "n_layers 1000000000 is out of range"),
    ("layers-0", dict(model_n_layers=0), "n_layers 0 is out of range"),
    ("kv-heads-3", dict(model_n_kv_heads=3), "n_kv_heads 3 does not divide"),
    ("eps-negative", dict(model_norm_eps=-1e-5), "norm_eps -1e-05 must be a finite number above 0"),
    ("arch", dict(model_arch="gemma\n⭕ fake"), "arch 'gemma\\n⭕ fake' is not a supported architecture"),
    ("timeout-huge", dict(timeout=1e300), "values out of range"),
    ("heartbeat-tiny", dict(heartbeat=1e-9), "values out of range"),
    ("max-seq-huge", dict(max_seq_len=2**40), "values out of range"),
    ("peer-host", dict(peers=[["evil\nhost", 1]]), "values out of range"),
    (
        "slice-beyond",
        dict(slice=dict(SLICE, kv_heads=[4, 9], q_heads=[4, 9])),
        "node slice this worker cannot",
    ),
    ("slice-partial-group", dict(slice=dict(SLICE, q_heads=[4, 7])), "node slice this worker cannot use"),
]
for name, fields, want in MODEL_CASES:
    WORKER_CASES.append(
        (
            f"model-{name}",
            as_root,
            (lambda f: lambda m: frame(Msg.CONFIG, session_config(m, **f)))(fields),
            "shut",
            want,
            re.escape(want[:20]),
        )
    )
TENSOR_CASES = [  # after a valid session config
    ("tensor-nested", frame(Msg.TENSOR, b"[" * 4000), "shut", "tensor header nested 4000 levels"),
    ("tensor-name-list", tensor(["a"]), "shut", "sent tensor ['a'], which node 1 does not use"),
    (
        "tensor-unknown",
        tensor("blk.9.attn_q.weight"),
        "shut",
        "sent tensor 'blk.9.attn_q.weight', which node",
    ),
    ("tensor-shape-bool", tensor(Q, shape=[True, 256]), "shut", f"sent tensor {Q} with a bad type or shape"),
    ("tensor-dtype", tensor(Q, dtype="f99"), "shut", f"sent tensor {Q} with a bad type or shape"),
    ("tensor-cut", tensor(Q) + bytes(1000), "close", None),
    ("tensor-none", frame(Msg.WEIGHTS_DONE), "shut", "the root sent no tensor"),
    ("tensor-mesh", frame(Msg.MESH), "shut", "sent MESH where a tensor was expected"),
]
for name, data, then, want in TENSOR_CASES:
    WORKER_CASES.append(
        (name, configured(session_config), data, then, want, re.escape(want) if want else "closed")
    )
WORKER_CASES.append(
    (
        "tensor-over-budget",
        configured(lambda m: session_config(m, weight_bytes=10)),
        tensor(Q),
        "shut",
        "sent more than the 10 tensor bytes it announced",
        "10 tensor bytes",
    )
)


def drive(w: WorkerProc, model, case) -> tuple[list[str], float]:
    """Run one case against worker `w`; (the ERROR texts it replied with, seconds until it closed)."""
    name, before, data, then, _, _ = case
    host, port = w.address.rsplit(":", 1)
    t0 = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=5) as c:
        if before is as_root:
            as_root(c)
        elif before is not None:
            before(c, model)
        if callable(data):
            data = data(model)
        try:
            c.sendall(data)
        except OSError:
            pass  # it may refuse (and close) before taking everything
        if then == "close":
            return [], time.monotonic() - t0
        if then == "reset":
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return [], time.monotonic() - t0
        try:
            c.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        reply = until_closed(c, QUICK_BOUND)
    return error_texts(reply), time.monotonic() - t0


def serves(w: WorkerProc, model, backend) -> None:
    """`w` serves a real root, and is waiting for the next one again."""
    m = w.mark()
    assert_serves(model, backend, [w])
    w.wait_for("^⭕ Waiting for a root", m)


@pytest.mark.parametrize("case", WORKER_CASES, ids=[c[0] for c in WORKER_CASES])
def test_worker_meets_a_bad_peer(case, workers, model, backend):
    name, before, _, _, want, log = case
    a = workers[0]
    m = a.mark()
    errors, seconds = drive(a, model, case)
    assert seconds < QUICK_BOUND
    if want is not None:
        assert any(want in e for e in errors), (want, errors)
        for e in errors:
            assert_one_line(e)
    a.wait_for(log, m, timeout=QUICK_BOUND)
    if before is not None:  # a session began: the worker must be back to waiting for a root
        a.wait_for("^⭕ Waiting for a root", m, timeout=QUICK_BOUND)
    if WORKER_CASES.index(case) % 12 == 11:
        serves(a, model, backend)


def test_a_peers_words_cannot_forge_log_lines(workers, model, backend):
    a = workers[0]
    m = a.mark()
    fake_line = "⭕ Waiting for a root on 10.6.6.6:9999"
    with socket.create_connection((a.host, a.port), timeout=5) as c:
        c.sendall(greeting(Role.ROOT, json.dumps({"device": f"x\n{fake_line}", "host": "\x1b[2J"}).encode()))
        read_greeting(c)
        read_frame(c)
    a.wait_for("^⚠️ Session ended", m)
    a.wait_for("^⭕ Waiting for a root", m)  # its own line, not the forged text inside another
    assert fake_line not in a.lines
    assert not any("\x1b" in line for line in a.lines)
    serves(a, model, backend)


# ---- the slow cases end within their bounds, and every worker still serves ----
def test_slow_cases_end_within_their_bounds(background, workers, model, backend):
    for step, how, _, want, bound in CLI_CASES:
        p, seconds = background[f"cli-{step}-{how}"].result(timeout=SETUP_BOUND + 40)
        lines = [line for line in p.stderr.splitlines() if line.strip()]
        assert p.returncode == 2, (step, how, p.returncode, p.stderr)
        assert 1 <= len(lines) <= 3 and "Traceback" not in p.stderr, p.stderr
        assert re.search(RX_WORKER, p.stderr) and re.search(want, p.stderr), p.stderr
        assert seconds < bound, (step, how, seconds)
    _, b, c = workers
    assert background["session-silence"].result(timeout=SETUP_BOUND) < SETUP_BOUND
    assert background["session-trickle"].result(timeout=SETUP_BOUND) < SETUP_BOUND
    b.wait_for(r"Session ended: the root .* sent nothing for 30 s", 0)
    c.wait_for(r"Session ended: the root .* sent \d+ of 1000 bytes in 30\.\d s \(trickling", 0)
    for key in ("greeting-silence", "greeting-trickle-3s", "greeting-trickle-payload"):
        seconds, reply = background[key].result(timeout=GREETING_BOUND + 5)
        assert seconds < GREETING_BOUND, (key, seconds)
    c.wait_for(r"Connection from .* ended during its greeting: it sent nothing for 10 s", 0)
    c.wait_for(r"Connection from .* ended during its greeting: it sent [34] of 12 bytes in 10\.\d s", 0)
    c.wait_for(r"Connection from .* ended during its greeting: it sent \d+ of 3\d\d bytes in [45]\.\d s", 0)
    for i in range(20):
        seconds, _ = background[f"flood-{i}"].result(timeout=GREETING_BOUND + 5)
        assert seconds < GREETING_BOUND
    c.wait_for(r"Refused .*: 16 connections are already greeting", 0)
    for w in workers:
        assert w.proc.poll() is None
        assert not [line for line in w.lines if "Traceback" in line or "internal error" in line], w.lines
    assert_serves(model, backend, list(workers))
