"""The root's side of a cluster: connect the workers, stream their weight slices, drive every forward pass.

Set-up, per worker: connect (timeout naming the address), greetings (protocol version, capabilities),
session config, the worker's weight slices (progress lines on long transfers), then, once every worker has
compiled and warmed up its graph, the order to build the worker mesh. A forward pass sends each worker the
8-byte FORWARD message (consecutive positions in KV slot 0), or FORWARD_ROWS with every row's position and
slot, and runs the sync steps of `NodeSync`. Idle links get a PING every `heartbeat`
seconds from a background thread so workers can tell a live root from a dead one. Any link failure in a
forward pass closes every link (the surviving workers go back to waiting for a root) and raises one
DllamaError naming the worker and what happened.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from engine.backend import Backend, Program
from engine.errors import DllamaError
from engine.graph import Graph
from engine.slicing import NodeSlice, slice_weights
from engine.weights import Model, Weight
from net.protocol import (
    GREETING,
    HEARTBEAT_MIN,
    NET_TIMEOUT,
    PROTOCOL_VERSION,
    WEIGHT_CHUNK,
    Msg,
    ProtocolError,
    Role,
    SessionConfig,
    capabilities,
    check_timeout,
    compile_wait,
    describe,
    error_text,
    pack_forward,
    pack_forward_rows,
    pack_frame,
    pack_greeting,
    parse_greeting_head,
    parse_json,
    setup_silence,
    version_mismatch,
)
from net.slice_cache import model_identity, slice_key
from net.transport import Link, NodeSync, PeerError, Transfer, connect, exchange, parse_address

PROGRESS_EVERY = 1.0  # seconds between progress lines of a weight transfer
STOP_WAIT = 2.0  # seconds a worker gets to confirm STOP


class RootCluster:
    """Node 0's links to workers 1..N-1 of one session."""

    def __init__(
        self,
        model: Model,
        plan: Callable[[list[dict[str, Any]]], Sequence[NodeSlice]],
        addresses: Sequence[str],
        act: str,
        max_seq_len: int,
        max_batch: int,
        backend: Backend,
        timeout: float = NET_TIMEOUT,
        log: Callable[[str], None] = print,
        kv_type: str = "f32",
        n_slots: int = 1,
    ):
        timeout = check_timeout(timeout)
        self.addresses = [parse_address(a) for a in addresses]
        self.n_nodes = 1 + len(self.addresses)
        self.slices: list[NodeSlice] = []
        self.worker_caps: list[dict[str, Any]] = []  # what each worker said of itself, in node order
        self.timeout, self.log = timeout, log
        self.heartbeat = max(HEARTBEAT_MIN, min(1.0, timeout / 3))
        self.links: dict[int, Link] = {}
        self.sync: NodeSync | None = None
        self.failed: str | None = None
        self.closed = False
        self._stop = threading.Event()
        self._pinger = threading.Thread(target=self._ping_idle, name="dllama-heartbeat", daemon=True)
        session = secrets.token_hex(8)
        self.weight_bytes_sent = self.weight_bytes_cached = 0  # set-up totals over all workers
        try:
            caps = capabilities(backend)
            for k, (host, port) in enumerate(self.addresses, 1):
                self.links[k] = self._greet(k, host, port, caps)
            self._pinger.start()
            self.slices = list(plan(self.worker_caps))  # every worker's speed and memory are known now
            identity = model_identity(model)
            for k in self.links:
                try:
                    weights = slice_weights(model, self.slices[k])
                except DllamaError as e:
                    raise DllamaError(f"cannot cut node {k}'s slice for {self.n_nodes} nodes: {e}") from None
                weights.pop("token_embd.weight", None)  # the embedding never leaves the root
                sc = SessionConfig(
                    session=session,
                    node=k,
                    n_nodes=self.n_nodes,
                    act=act,
                    max_seq_len=max_seq_len,
                    max_batch=max_batch,
                    n_slots=n_slots,
                    kv_type=kv_type,
                    timeout=timeout,
                    heartbeat=self.heartbeat,
                    weight_bytes=sum(w.nbytes for w in weights.values()),
                    cache_key=slice_key(identity, self.slices[k], weights),
                    peers=self.addresses,
                    model=model.config,
                    slice=self.slices[k],
                )
                have: set[str] = set()
                self._setup_step(
                    k,
                    "the session config",
                    lambda link, sc=sc, w=weights, h=have: h.update(self._send_config(link, sc, w)),
                )
                self._setup_step(
                    k, "the weights", lambda link, w=weights, h=have: self._send_weights(link, w, h)
                )
                del weights
        except BaseException:
            self._abort()
            raise

    # ---- set-up ----
    def _greet(self, k: int, host: str, port: int, caps: dict) -> Link:
        """Connect worker k and exchange greetings; every failure is one line naming the worker."""
        name = f"worker {k} ({host}:{port})"
        link = connect(host, port, name, self.timeout)
        head = None
        try:
            link.send(pack_greeting(Role.ROOT, caps), self.timeout)
            head = link.recv_exact(GREETING.size, self.timeout)
            try:
                version, role, length = parse_greeting_head(head, name)
            except ProtocolError as e:
                raise ProtocolError(f"{e}: is it a `dllama worker`?") from None
            if version != PROTOCOL_VERSION:
                raise ProtocolError(version_mismatch(name, version))
            wcaps = parse_json(link.recv_exact(length, self.timeout), "greeting", name)
            if role != Role.WORKER:
                what = Role(role).name.lower() if role in set(Role) else f"node of role {role}"
                raise ProtocolError(f"{name} answered as a {what}, not as a worker")
            link.expect(Msg.OK, self.timeout, of=Msg.OK, total=self.timeout)
        except PeerError as e:
            link.close()
            if head is None and e.kind == "silent" and link.recv == 0:
                raise DllamaError(
                    f"{name} accepted the connection but sent no dllama greeting within "
                    f"{self.timeout:g} s: is a `dllama worker` listening there?"
                ) from None
            hint = ": is it a dllama worker?" if head is None else ""
            raise DllamaError(f"{e} during the greeting{hint}") from None
        except BaseException:
            link.close()
            raise
        self.log(f"⭕ Worker {k} at {host}:{port}: {describe(wcaps)}")
        self.worker_caps.append(wcaps)
        return link

    def _setup_step(self, k: int, what: str, step: Callable[[Link], None]) -> None:
        """Send `what` to worker k; a worker that hangs up explains itself in an ERROR frame."""
        link = self.links[k]
        try:
            with link.lock:
                step(link)
        except PeerError as e:
            try:
                f = link.read_frame(0.5, total=0.5)
            except DllamaError:
                f = None
            if f is not None and f.msg == Msg.ERROR:
                raise DllamaError(f"{link.name}: {error_text(f.payload)}") from None
            raise DllamaError(f"{e} while the root sent it {what}") from None

    def _send_config(self, link: Link, sc: SessionConfig, weights: dict[str, Weight]) -> set[str]:
        """Send the session config; returns the tensors the worker's slice cache already holds."""
        link.send(pack_frame(Msg.CONFIG, sc.to_bytes()), self.timeout)
        silence = setup_silence(self.timeout)
        link.expect(Msg.OK, silence, of=Msg.CONFIG, total=silence)
        f = link.expect(Msg.HAVE, silence, total=compile_wait(self.timeout))  # it may read a large cache
        names = parse_json(f.payload, "list of cached tensors", link.name).get("have")
        if not isinstance(names, list) or not all(isinstance(n, str) and n in weights for n in names):
            raise ProtocolError(f"{link.name} listed cached tensors that its slice does not hold")
        return set(names)

    def _send_weights(self, link: Link, weights: dict[str, Weight], have: set[str]) -> None:
        total = sum(w.nbytes for n, w in weights.items() if n not in have)
        cached = sum(w.nbytes for n, w in weights.items() if n in have)
        t0 = last = time.monotonic()
        done = 0
        for name, w in weights.items():
            if name in have:
                continue
            header = {"name": name, "dtype": w.dtype, "shape": list(w.shape)}
            link.send(pack_frame(Msg.TENSOR, json.dumps(header).encode()), self.timeout)
            data = memoryview(np.ascontiguousarray(w.data)).cast("B")
            if len(data) != w.nbytes:
                raise DllamaError(f"tensor {name} holds {len(data)} bytes, its shape needs {w.nbytes}")
            for i in range(0, len(data), WEIGHT_CHUNK):
                link.send(data[i : i + WEIGHT_CHUNK], setup_silence(self.timeout))
                done += min(WEIGHT_CHUNK, len(data) - i)
                now = time.monotonic()
                if now - last >= PROGRESS_EVERY:
                    self.log(f"💿 {link.name}: {done / 1e6:.1f} / {total / 1e6:.1f} MB of weights sent")
                    last = now
        link.send(pack_frame(Msg.WEIGHTS_DONE), self.timeout)
        dt = time.monotonic() - t0
        from_cache = f" ({cached / 1e6:.1f} MB from its slice cache)" if cached else ""
        self.log(f"💿 {link.name}: {total / 1e6:.1f} MB of weights sent in {dt:.1f} s{from_cache}")
        self.weight_bytes_sent += total
        self.weight_bytes_cached += cached

    def start(self, program: Program, graph: Graph) -> None:
        """Wait until every worker has compiled its graph, build the mesh, and get ready for forwards."""
        silence = setup_silence(self.timeout)
        step = "while the root waited for it to compile its slice"
        try:
            for link in self.links.values():
                link.expect(Msg.OK, silence, of=Msg.WEIGHTS_DONE, total=compile_wait(self.timeout))
            for k in self.links:
                self._setup_step(
                    k,
                    "the order to build the mesh",
                    lambda link: link.send(pack_frame(Msg.MESH), self.timeout),
                )
            step = "while the root waited for it to build the mesh"
            for link in self.links.values():
                # a worker connects the higher-numbered ones, then waits up to `silence` for the lower ones
                link.expect(Msg.OK, silence, of=Msg.MESH, total=2 * silence)
        except PeerError as e:
            self._abort()
            raise DllamaError(f"{e} {step}") from None
        except BaseException:
            self._abort()
            raise
        self.sync = NodeSync(graph, program, self.links, self.timeout, [s.vocab for s in self.slices])
        self.log(f"🔗 Cluster of {self.n_nodes} nodes ready (full mesh, {graph.act} sync)")

    # ---- forward passes ----
    @contextmanager
    def forward(self, positions: np.ndarray, slots: Sequence[int], mode: str) -> Iterator[None]:
        """Hold every link for one forward pass: send its control message, let the caller run segments and
        syncs. Rows at consecutive positions of slot 0 go as the 8-byte FORWARD, others as FORWARD_ROWS."""
        if self.failed or self.closed or self.sync is None:
            raise DllamaError(f"the cluster is down: {self.failed or 'it was closed'}")
        links = list(self.links.values())
        for link in links:
            link.lock.acquire()
        try:
            broken = next((link for link in links if link.broken), None)
            if broken is not None:
                raise PeerError(broken, broken.broken)
            n, pos = len(positions), int(positions[0])
            if not any(slots) and np.array_equal(positions, np.arange(pos, pos + n)):
                control = pack_forward(pos, n, mode)
            else:
                control = pack_forward_rows([int(p) for p in positions], [int(s) for s in slots], mode)
            exchange([Transfer(link, out=control) for link in links], self.timeout)
            yield
        except PeerError as e:
            self._abort(f"{e} during a forward pass")
            if e.kind == "closed":
                hint = "it crashed, was killed or lost its network (see its log)"
            else:
                hint = "raise --net-timeout if it is only slow"
            raise DllamaError(f"{self.failed}: {hint}; the other workers were released") from None
        except BaseException:
            self._abort("the root stopped in the middle of a forward pass")
            raise
        finally:
            for link in links:
                link.lock.release()

    def totals(self) -> tuple[float, int, int]:
        """(seconds spent in sync, payload bytes sent, bytes received) since the cluster was set up."""
        sync_s = self.sync.sync_s if self.sync else 0.0
        return sync_s, sum(x.sent for x in self.links.values()), sum(x.recv for x in self.links.values())

    def logits(self, rows: int) -> np.ndarray:
        """The full-vocabulary logits rows gathered in the last forward pass."""
        return self.sync.full_logits[:rows].copy()

    # ---- keep-alive and teardown ----
    def _ping_idle(self) -> None:
        ping = pack_frame(Msg.PING)
        while not self._stop.wait(self.heartbeat):
            for link in list(self.links.values()):
                if link.broken or not link.lock.acquire(blocking=False):
                    continue
                try:
                    link.send(ping, self.timeout)
                except PeerError:
                    pass  # marked broken; the next forward pass reports it
                finally:
                    link.lock.release()

    def _abort(self, reason: str = "the set-up failed") -> None:
        """Close every link at once: workers see the connection end and go back to waiting for a root."""
        self.failed = self.failed or reason
        self.closed = True
        self._stop.set()
        for link in self.links.values():
            link.close()

    def close(self) -> None:
        """Tell every worker the session is over and wait (briefly) until each has freed its slice."""
        if self.closed:
            return
        self._stop.set()
        if self._pinger.is_alive():
            self._pinger.join(timeout=5)
        live = [link for link in self.links.values() if not link.broken]
        for link in live:
            try:
                link.send(pack_frame(Msg.STOP), STOP_WAIT)
            except PeerError:
                pass
        for link in live:
            try:
                link.expect(Msg.OK, STOP_WAIT, of=Msg.STOP, total=STOP_WAIT)
            except DllamaError:
                pass
        self.closed = True
        for link in self.links.values():
            link.close()
