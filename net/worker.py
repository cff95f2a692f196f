"""`dllama worker`: serve one root at a time, compute its slice of every forward pass, then wait for the next.

A listener thread greets every incoming connection (refusing non-dllama peers, other protocol versions, a
second root while one is served, and strangers to the current session) and hands roots to the main
thread, which runs the session: session config -> memory check -> weight slices -> compile and warm up ->
mesh with the other workers -> forward passes until STOP or a failure. A session always ends with every
buffer released, so the next root finds the worker as fresh as after start-up.
"""

from __future__ import annotations

import ctypes
import errno
import gc
import json
import os
import queue
import socket
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np

from engine.backend import Backend
from engine.calibrate import measure_speed
from engine.errors import DllamaError
from engine.graph import Graph, build_graph
from engine.runner import run_graph, warm_up
from engine.slicing import kv_cache_bytes, node_tensors
from engine.weight_types import WEIGHT_TYPES, row_bytes
from engine.weights import Weight, empty_weight
from net.protocol import (
    GREETING,
    HEADER,
    MODES,
    NET_TIMEOUT,
    PROTOCOL_VERSION,
    WEIGHT_CHUNK,
    Msg,
    ProtocolError,
    Role,
    SessionConfig,
    available_memory,
    capabilities,
    describe,
    idle_silence,
    pack_error,
    pack_frame,
    pack_greeting,
    parse_forward_rows,
    parse_greeting_head,
    parse_json,
    printable,
    setup_silence,
    version_mismatch,
)
from net.slice_cache import SliceCache
from net.transport import Link, NodeSync, PeerError, connect

GREETING_WAIT = 10.0  # seconds a new connection has to complete its greeting, however it trickles
MAX_GREETINGS = 16  # connections greeted at once; more are closed at once (a flood cannot exhaust threads)


class _Stopped(Exception):
    """The root sent STOP."""


class WorkerServer:
    """A listening socket plus the session loop; `serve_forever` never returns."""

    def __init__(
        self,
        host: str,
        port: int,
        backend: Backend,
        log: Callable[[str], None] = print,
        cache: SliceCache | None = None,
    ):
        self.backend, self.log, self.cache = backend, log, cache
        self.speed: float | None = None
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            self.listener = socket.create_server((host, port), family=family, backlog=16)
        except OSError as e:
            reason = os.strerror(e.errno) if e.errno else str(e)
            raise DllamaError(f"cannot listen on {host}:{port}: {reason}") from None
        self.host, self.port = host, self.listener.getsockname()[1]
        self._lock = threading.Lock()
        self._serving: str | None = None  # address of the root being served
        self._session: str | None = None  # id of its session, once configured
        self._roots: queue.Queue[Link] = queue.Queue()
        self._mesh: queue.Queue[tuple[int, Link]] = queue.Queue()
        self._greeting = threading.BoundedSemaphore(MAX_GREETINGS)

    def serve_forever(self) -> None:
        self.speed = measure_speed(self.backend)  # before listening: every greeting reports it
        threading.Thread(target=self._accept_loop, name="dllama-accept", daemon=True).start()
        caps = describe(capabilities(self.backend, self.speed))
        self.log(f"Listening on {self.host}:{self.port}... ({caps}, protocol {PROTOCOL_VERSION})")
        while True:
            self._serve(self._roots.get())
            self.log(f"⭕ Waiting for a root on {self.host}:{self.port}")

    # ---- greeting every connection (listener thread + one short-lived thread per connection) ----
    def _accept_loop(self) -> None:
        while True:
            try:
                sock, addr = self.listener.accept()
            except OSError as e:
                if e.errno in (errno.EBADF, errno.EINVAL):  # the listener was closed
                    return
                self.log(f"⚠️ Cannot accept a connection: {os.strerror(e.errno) if e.errno else e}")
                time.sleep(0.1)  # out of descriptors or memory: let greetings finish
                continue
            if not self._greeting.acquire(blocking=False):
                self.log(f"⚠️ Refused {addr[0]}:{addr[1]}: {MAX_GREETINGS} connections are already greeting")
                sock.close()
                continue
            threading.Thread(target=self._greet, args=(sock, addr), daemon=True).start()

    def _greet(self, sock: socket.socket, addr: tuple) -> None:
        """Greet one connection within GREETING_WAIT in all; whatever it sends, this thread ends with the
        connection handed on (a root or a mesh peer) or closed, and at most one line in the log."""
        peer = f"{addr[0]}:{addr[1]}"
        try:
            link = Link(sock, f"the connection from {peer}")
        except OSError as e:  # the peer already hung up
            sock.close()
            self._greeting.release()
            self.log(f"⚠️ Connection from {peer} ended before its greeting: {e.strerror or e}")
            return
        greeted = handed_on = False
        try:
            deadline = time.monotonic() + GREETING_WAIT
            head = link.recv_exact(GREETING.size, GREETING_WAIT, deadline)
            version, role, length = parse_greeting_head(head, peer)
            caps = parse_json(link.recv_exact(length, GREETING_WAIT, deadline), "greeting", peer)
            hello = pack_greeting(Role.WORKER, capabilities(self.backend, self.speed))
            link.send(hello, GREETING_WAIT, deadline)
            greeted = True
            if version != PROTOCOL_VERSION:
                raise ProtocolError(version_mismatch(peer, version))
            if role == Role.ROOT:
                self._admit_root(link, peer, caps)
            elif role == Role.PEER:
                self._admit_peer(link, peer, caps)
            else:
                raise ProtocolError(f"{peer} greeted as role {role}; a worker serves roots and their workers")
            handed_on = True
        except ProtocolError as e:
            self.log(f"⚠️ Refused {peer}: {printable(e, 500)}")
            try:
                if not greeted:
                    link.send(pack_greeting(Role.WORKER, capabilities(self.backend, self.speed)), 1.0)
                link.send(pack_error(f"refused: {e}"), 1.0)
            except PeerError:
                pass
            link.hang_up()
        except PeerError as e:
            self.log(f"⚠️ Connection from {peer} ended during its greeting: it {e.reason}")
        except Exception as e:  # a bug must not leave the connection open or the log with a traceback
            self.log(f"⚠️ Refused {peer}: internal error while greeting it: {printable(repr(e), 300)}")
        finally:
            if not handed_on:
                link.close()
            self._greeting.release()

    def _admit_root(self, link: Link, peer: str, caps: dict) -> None:
        with self._lock:
            busy = self._serving
            if busy is None:
                self._serving = peer
        if busy is not None:
            raise ProtocolError(f"busy: this worker is serving the root at {busy}; try again when it is done")
        link.name = f"the root ({peer})"
        try:
            link.send(pack_frame(Msg.OK, a=Msg.OK), GREETING_WAIT)
        except BaseException:
            with self._lock:
                self._serving = None
            raise
        self.log(f"⭕ Root {peer} connected: {describe(caps)}")
        self._roots.put(link)

    def _admit_peer(self, link: Link, peer: str, caps: dict) -> None:
        node = caps.get("node")
        with self._lock:
            ours = self._session is not None and caps.get("session") == self._session
        if not ours or not isinstance(node, int) or isinstance(node, bool):
            raise ProtocolError(f"{peer} belongs to no session of this worker")
        link.name = f"node {node} ({peer})"
        link.send(pack_frame(Msg.OK, a=Msg.OK), GREETING_WAIT)
        self._mesh.put((node, link))

    # ---- one root's session (main thread) ----
    def _serve(self, root: Link) -> None:
        session = _Session(self, root)
        stopped = False
        try:
            session.run()
        except _Stopped:
            stopped = True
        except PeerError as e:
            self.log(f"⚠️ Session ended: {e}")
            if e.link is not root:  # a mesh peer failed: the root sees it too; let it close first
                root.drain(setup_silence(session.timeout))
        except DllamaError as e:
            self.log(f"⚠️ Session ended: {e}")
            self._tell_root(root, str(e))
        except Exception as e:  # a bug must not take the worker down: report it and serve the next root
            self.log(f"⚠️ Session failed: {e!r}\n{traceback.format_exc()}")
            self._tell_root(root, f"internal error: {e!r}")
        finally:
            session_summary = session.summary
            session.release()
            del session
            _release_memory()
            while not self._mesh.empty():
                self._mesh.get_nowait()[1].close()
            with self._lock:
                self._serving = self._session = None
        if stopped:  # confirmed only now, so that the root's next session finds this worker free
            self.log(f"🛑 Stop: {session_summary}")
            try:
                root.send(pack_frame(Msg.OK, a=Msg.STOP), 1.0)
            except PeerError:
                pass
        root.hang_up(0.5 if stopped else 0.0)

    def _tell_root(self, root: Link, text: str) -> None:
        if root.broken:
            return
        try:
            root.send(pack_error(text), 1.0)
        except PeerError:
            pass
        root.hang_up()


class _Session:
    """State of one root's session; `release()` drops every buffer and closes the mesh links."""

    def __init__(self, server: WorkerServer, root: Link):
        self.server, self.root, self.log = server, root, server.log
        self.timeout = NET_TIMEOUT
        self.links: dict[int, Link] = {0: root}
        self.program = None
        self.weights: dict[str, Weight] = {}
        self.summary = "the root ended the session before any forward pass"

    def release(self) -> None:
        for j, link in self.links.items():
            if j != 0:
                link.close()
        self.links = {}
        self.program = None
        self.weights = {}

    def _frame(self, timeout: float):
        f = self.root.read_frame(timeout)
        if f.msg == Msg.STOP:
            raise _Stopped
        return f

    def _expect(self, msg: Msg, timeout: float) -> bytes:
        f = self._frame(timeout)
        if f.msg != msg:
            raise ProtocolError(f"{self.root.name} sent {f.msg.name} where {msg.name} was expected")
        return f.payload

    def run(self) -> None:
        sc = SessionConfig.from_bytes(self._expect(Msg.CONFIG, setup_silence(NET_TIMEOUT)), self.root.name)
        self.timeout = sc.timeout
        idle = setup_silence(sc.timeout)
        with self.server._lock:
            self.server._session = sc.session
        cfg = sc.model
        graph = build_graph(cfg, sc.slice, sc.act, sc.max_seq_len, sc.kv_type, sc.n_slots)
        self.log(
            f"⭕ Node {sc.node} of {sc.n_nodes}: {cfg.arch}, dim {cfg.dim}, {cfg.n_layers} layers, "
            f"{graph.slice.n_heads} of {cfg.n_heads} heads, "
            f"{graph.slice.n_kv_heads} of {cfg.n_kv_heads} KV heads, {sc.act} sync"
        )
        on_host = self.server.backend.name == "cpu"  # a Vulkan program checks its cache and buffers itself
        need, held = sc.weight_bytes, "its slice needs"
        if on_host:
            need += kv_cache_bytes(cfg, sc.slice, sc.n_slots * sc.max_seq_len, sc.kv_type)
            need += sc.max_batch * sum(b.row_bytes for b in graph.buffers.values())
            held = "its slice, KV cache and buffers need"
        free = available_memory()
        if free and need > free:
            many = on_host and sc.n_slots > 1
            slots = f" ({sc.n_slots} KV slots: lower --parallel or --max-seq-len)" if many else ""
            raise DllamaError(
                f"not enough memory for node {sc.node}: {held} {need / 1e9:.2f} GB, "
                f"{free / 1e9:.2f} GB are available{slots}"
            )
        self.root.send(pack_frame(Msg.OK, a=Msg.CONFIG), sc.timeout)
        expected, cache = node_tensors(cfg, sc.slice), self.server.cache
        if cache is not None:
            with _keepalive(self.root, sc.heartbeat):
                self.weights = cache.load(sc.cache_key, expected)
        have = json.dumps({"have": sorted(self.weights)}).encode()
        self.root.send(pack_frame(Msg.HAVE, have), sc.timeout)
        cached = set(self.weights)
        self._receive_weights(sc, expected, idle)
        with _keepalive(self.root, sc.heartbeat):
            if cache is not None:
                cache.store(sc.cache_key, self.weights, set(self.weights) - cached)
            self.program = self.server.backend.compile(graph, self.weights, sc.max_batch)
            warm_up(self.program, graph, sc.max_batch, networked=True)
        self.root.send(pack_frame(Msg.OK, a=Msg.WEIGHTS_DONE), sc.timeout)
        self._expect(Msg.MESH, idle)
        self._build_mesh(sc)
        self.root.send(pack_frame(Msg.OK, a=Msg.MESH), sc.timeout)
        self.log(f"🚀 Ready: mesh of {sc.n_nodes} nodes")
        self._forwards(sc, graph)

    def _receive_weights(self, sc: SessionConfig, expected: dict, idle: float) -> None:
        """TENSOR messages until WEIGHTS_DONE; each is checked against the graph before its bytes are read."""
        cached = sum(w.nbytes for w in self.weights.values())  # from the slice cache
        t0, total, peer = time.monotonic(), cached, self.root.name
        while True:
            f = self._frame(idle)
            if f.msg == Msg.WEIGHTS_DONE:
                break
            if f.msg != Msg.TENSOR:
                raise ProtocolError(f"{peer} sent {f.msg.name} where a tensor was expected")
            h = parse_json(f.payload, "tensor header", peer)
            name, dtype, shape = h.get("name"), h.get("dtype"), h.get("shape")
            if not isinstance(name, str) or name not in expected or name in self.weights:
                raise ProtocolError(
                    f"{peer} sent tensor {printable(repr(name), 100)}, which node {sc.node} does not use"
                )
            if (
                not isinstance(dtype, str)
                or dtype not in WEIGHT_TYPES
                or not isinstance(shape, list)
                or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape)
            ):
                raise ProtocolError(f"{peer} sent tensor {name} with a bad type or shape")
            if tuple(shape) != expected[name][0]:
                need = "x".join(map(str, expected[name][0]))
                got = "x".join(map(str, shape))
                raise ProtocolError(f"{peer} sent tensor {name} as {got}; node {sc.node} needs {need}")
            nbytes = int(np.prod(shape[:-1])) * row_bytes(dtype, shape[-1])
            if total + nbytes > sc.weight_bytes:
                raise ProtocolError(f"{peer} sent more than the {sc.weight_bytes} tensor bytes it announced")
            w = empty_weight(name, dtype, tuple(shape))
            data = memoryview(w.data).cast("B")
            for i in range(0, len(data), WEIGHT_CHUNK):  # each chunk a step: slow links keep progressing
                self.root.recv_into(data[i : i + WEIGHT_CHUNK], idle)
            self.weights[name] = w
            total += nbytes
        missing = sorted(n for n, (_, required) in expected.items() if required and n not in self.weights)
        if missing:
            raise DllamaError(f"the root sent no tensor {missing[0]} ({len(missing)} missing)")
        dt = time.monotonic() - t0
        from_cache = f" ({cached / 1e6:.1f} MB from the slice cache)" if cached else ""
        self.log(f"💿 Received {len(self.weights)} tensors, {total / 1e6:.1f} MB in {dt:.1f} s{from_cache}")

    def _build_mesh(self, sc: SessionConfig) -> None:
        """Connect to every higher-numbered worker, accept every lower-numbered one (full mesh)."""
        hello = pack_greeting(Role.PEER, {"session": sc.session, "node": sc.node})
        for j in range(sc.node + 1, sc.n_nodes):
            host, port = sc.peers[j - 1]
            name = f"node {j} ({host}:{port})"
            link = connect(host, port, name, sc.timeout)
            self.links[j] = link
            deadline = time.monotonic() + 2 * sc.timeout  # the whole greeting, however it trickles
            link.send(hello, sc.timeout, deadline)
            head = link.recv_exact(GREETING.size, sc.timeout, deadline)
            version, _, length = parse_greeting_head(head, name)
            if version != PROTOCOL_VERSION:
                raise ProtocolError(version_mismatch(name, version))
            link.recv_exact(length, sc.timeout, deadline)
            link.expect(Msg.OK, sc.timeout, of=Msg.OK, total=sc.timeout)
        deadline = time.monotonic() + setup_silence(sc.timeout)
        while len(self.links) < sc.n_nodes - 1:  # every node but this one
            try:
                node, link = self.server._mesh.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                lower = [j for j in range(1, sc.node) if j not in self.links]
                raise DllamaError(f"workers {lower} never connected to node {sc.node}") from None
            if not 1 <= node < sc.node or node in self.links:
                link.close()
                raise ProtocolError(f"{link.name} claims a node index this worker does not expect")
            self.links[node] = link

    def _forwards(self, sc: SessionConfig, graph: Graph) -> None:
        """FORWARD after FORWARD until STOP; a root silent for idle_silence() between passes is given up."""
        sync = NodeSync(graph, self.program, self.links, sc.timeout + 1.0)
        pos_pipe = self.program.pipe("pos")
        slot_pipe = self.program.pipe("slot") if sc.n_slots > 1 else None
        passes = sent = recv = 0
        idle = idle_silence(sc.timeout)
        while True:
            f = self._frame(idle)
            if f.msg == Msg.FORWARD:
                mode, n, pos = f.a, f.b, f.c
                if mode >= len(MODES) or not 1 <= n <= sc.max_batch or pos + n > sc.max_seq_len:
                    raise ProtocolError(f"{self.root.name} asked for a forward pass out of range ({n}@{pos})")
                pos_pipe[:n, 0] = np.arange(pos, pos + n)
                if slot_pipe is not None:
                    slot_pipe[:n, 0] = 0
                mode_name = MODES[mode]
            elif f.msg == Msg.FORWARD_ROWS:
                mode_name, positions, slots = parse_forward_rows(
                    f, sc.max_batch, sc.max_seq_len, sc.n_slots, self.root.name
                )
                n = len(positions)
                pos_pipe[:n, 0] = positions
                if slot_pipe is not None:
                    slot_pipe[:n, 0] = slots
            else:
                raise ProtocolError(f"{self.root.name} sent {f.msg.name} instead of a forward pass")
            s0 = sum(x.sent for x in self.links.values())
            r0 = sum(x.recv for x in self.links.values())
            run_graph(self.program, graph.segments, n, mode_name, sync)
            passes += 1
            sent += sum(x.sent for x in self.links.values()) - s0
            recv += sum(x.recv for x in self.links.values()) - r0 + HEADER.size + len(f.payload)
            self.summary = (
                f"{passes} forward passes; sent {sent} B, received {recv} B in them "
                f"(sync {sync.sync_s:.2f} s)"
            )


def _release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc keeps them otherwise), so that an idle
    worker occupies no more memory than before its first root."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


@contextmanager
def _keepalive(link: Link, interval: float) -> Iterator[None]:
    """PING the root every `interval` s while this thread compiles, so it can tell slow from dead."""
    stop = threading.Event()

    def run() -> None:
        ping = pack_frame(Msg.PING)
        while not stop.wait(interval):
            try:
                link.send(ping, interval * 3)
            except PeerError:
                return

    t = threading.Thread(target=run, name="dllama-keepalive", daemon=True)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()


def serve(
    host: str,
    port: int,
    backend: Backend,
    log: Callable[[str], None] | None = None,
    cache_dir: str | None = None,
    cache_size: int | None = None,
) -> None:
    """Run a worker until the process is stopped; every log line is flushed at once. With `cache_dir` it keeps
    the slices it receives there (at most `cache_size` bytes) for roots that reconnect with the same model."""
    log = log or (lambda line: print(line, flush=True))
    cache = SliceCache(cache_dir, cache_size, log) if cache_dir is not None else None
    WorkerServer(host, port, backend, log, cache).serve_forever()
