"""TCP links between nodes and the sync steps a node runs between graph segments.

All sockets are non-blocking with TCP_NODELAY. `exchange` moves the bytes of several links at once with
poll(), so two nodes sending each other more than their socket buffers hold never deadlock, and a peer that
sends nothing for `timeout` seconds (dead, SIGSTOPped, unplugged), closes its end, or trickles so slowly that
the step overruns its deadline (`step_time`: the silence bound plus its bytes at MIN_RATE) raises a PeerError
naming it. `NodeSync` is the network half of a forward pass: broadcast of `x` by the root, the all-to-all
exchange of the partial sums in `zq` over a full mesh, and the gather of the logits rows at the root
(spec 5.6).
"""

from __future__ import annotations

import os
import select
import socket
import threading
import time
from collections.abc import Sequence

import numpy as np

from engine.backend import Program
from engine.errors import DllamaError
from engine.graph import Graph, Sync
from net.protocol import HEADER, Frame, Msg, ProtocolError, error_text, parse_header, step_time

_POLL_ERR = select.POLLERR | select.POLLHUP | select.POLLNVAL
_POLL_MAX = 3600.0  # seconds of one poll() call (a longer wait loops)
# Seconds an exchange keeps polling before it sleeps: waking a sleeping process costs 0.1-0.4 ms on a VM whose
# core went idle (measured: a 1 ms wait took 1.43 ms sleeping, 1.08 ms polling), while the waits between
# nodes are mostly shorter than this. The spin yields the core whenever anything else is runnable on it; a
# yield that took LOST_TURN_S or more gave the core to another process for its time slice (a busy program
# beside this node: one such yield per exchange cut a 2-node decode from 33 to 10 tokens/s), so after one
# the exchanges sleep at once for CALM_S, and their wake-ups hand the core straight back.
SPIN_S = 0.002
LOST_TURN_S = 0.001
CALM_S = 1.0
_calm = [0.0]  # time.monotonic() before which exchanges do not spin


class PeerError(DllamaError):
    """A link failed; `link` says which peer, `kind` how: "closed" (closed or reset), "silent" (nothing
    for the silence bound), "slow" (too few bytes before the step's deadline) or "failed" (an OS error)."""

    def __init__(self, link: Link, reason: str, kind: str = "failed"):
        super().__init__(f"{link.name} {reason}")
        self.link, self.reason, self.kind = link, reason, kind


def _os_error(link: Link, e: OSError) -> PeerError:
    if isinstance(e, ConnectionResetError | BrokenPipeError | ConnectionAbortedError):
        link.broken = "closed the connection (reset by peer)"
        return PeerError(link, link.broken, "closed")
    link.broken = f"failed: {e.strerror or e}"
    return PeerError(link, link.broken)


class Link:
    """One TCP connection to another node, with byte counters and a lock for writers of whole messages."""

    def __init__(self, sock: socket.socket, name: str):
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock, self.name, self.fd = sock, name, sock.fileno()
        self.sent = 0
        self.recv = 0
        self.lock = threading.Lock()
        self.broken: str | None = None  # set when a message was cut short: the stream is unusable

    def send(self, data: bytes | memoryview, timeout: float, deadline: float | None = None) -> None:
        exchange([Transfer(self, out=data)], timeout, deadline)

    def recv_into(self, view: memoryview, timeout: float, deadline: float | None = None) -> None:
        exchange([Transfer(self, into=view)], timeout, deadline)

    def recv_exact(self, n: int, timeout: float, deadline: float | None = None) -> bytes:
        buf = bytearray(n)
        if n:
            self.recv_into(memoryview(buf), timeout, deadline)
        return bytes(buf)

    def read_frame(self, timeout: float, total: float | None = None) -> Frame:
        """The next frame other than PING. `timeout` is the longest silence allowed (pings restart it);
        `total`, where given, the seconds within which the frame must arrive even while pings keep coming."""
        end = None if total is None else time.monotonic() + total
        silence = timeout
        while True:
            try:
                head = self.recv_exact(HEADER.size, silence)
            except PeerError as e:
                if e.kind != "silent" or silence == timeout:
                    raise
                head = None
            if head is not None:
                msg, a, b, c = parse_header(head, self.name)
                payload = b"" if msg == Msg.FORWARD else self.recv_exact(c, timeout)
                if msg != Msg.PING:
                    return Frame(msg, a, b, c, payload)
            if end is not None:  # after a ping, only what is left of `total`
                silence = min(timeout, end - time.monotonic())
                if head is None or silence <= 0:
                    self.broken = f"gave no answer within {total:g} s (only keep-alives)"
                    raise PeerError(self, self.broken, "slow")

    def expect(self, msg: Msg, timeout: float, of: Msg | None = None, total: float | None = None) -> Frame:
        """The next frame, which must be `msg` (an OK acknowledging `of`); an ERROR frame raises its text."""
        f = self.read_frame(timeout, total)
        if f.msg == Msg.ERROR:
            raise DllamaError(f"{self.name}: {error_text(f.payload)}")
        if f.msg != msg or (of is not None and f.a != of):
            raise ProtocolError(f"{self.name} sent {f.msg.name} (a={f.a}) where {msg.name} was expected")
        return f

    def drain(self, limit: float) -> None:
        """Read and discard until the peer closes or `limit` seconds pass (lets our last message arrive)."""
        deadline = time.monotonic() + limit
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        while (left := deadline - time.monotonic()) > 0:
            try:
                if not self.sock.recv(1 << 16):
                    return
            except BlockingIOError:
                poller.poll(left * 1000 + 1)
            except OSError:
                return

    def hang_up(self, limit: float = 1.0) -> None:
        """Close politely: stop sending, drain what the peer still sends for up to `limit` s, close."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
            self.drain(limit)
        except OSError:
            pass
        self.close()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class Transfer:
    """Bytes to send to and/or receive from one link within an exchange."""

    __slots__ = ("link", "out", "out_at", "into", "into_at", "last")

    def __init__(self, link: Link, out: bytes | memoryview | None = None, into: memoryview | None = None):
        self.link = link
        # flat byte views: a 2-D view would be sliced and measured in rows while out_at/into_at count bytes
        self.out = memoryview(out).cast("B") if out is not None else None
        self.into = memoryview(into).cast("B") if into is not None else None
        self.out_at = self.into_at = 0
        self.last = 0.0

    @property
    def nbytes(self) -> int:
        return (len(self.out) if self.out is not None else 0) + (
            len(self.into) if self.into is not None else 0
        )

    @property
    def events(self) -> int:
        """The poll() events this transfer still waits for."""
        return (select.POLLOUT if self.out_left else 0) | (select.POLLIN if self.into_left else 0)

    @property
    def out_left(self) -> bool:
        return self.out is not None and self.out_at < len(self.out)

    @property
    def into_left(self) -> bool:
        return self.into is not None and self.into_at < len(self.into)

    def pump_out(self) -> None:
        sock, out = self.link.sock, self.out
        while self.out_at < len(out):
            try:
                n = sock.send(out[self.out_at :])
            except BlockingIOError:
                return
            except OSError as e:
                raise _os_error(self.link, e) from None
            self.out_at += n
            self.link.sent += n
            self.last = time.monotonic()

    def pump_in(self) -> None:
        sock, into = self.link.sock, self.into
        while self.into_at < len(into):
            try:
                n = sock.recv_into(into[self.into_at :])
            except BlockingIOError:
                return
            except OSError as e:
                raise _os_error(self.link, e) from None
            if n == 0:
                self.link.broken = "closed the connection"
                raise PeerError(self.link, self.link.broken, "closed")
            self.into_at += n
            self.link.recv += n
            self.last = time.monotonic()


def exchange(transfers: Sequence[Transfer], timeout: float, deadline: float | None = None) -> None:
    """Complete every transfer from its start, sending and receiving on all links at once.

    Sends are tried first in list order. A waiting exchange polls without sleeping for up to SPIN_S (yielding
    the core to anything else runnable on it), then sleeps in poll(). A link on which no byte moves for
    `timeout` seconds while it still owes or is owed data raises PeerError, as does a closed or reset
    connection, and so does the exchange still unfinished at `deadline` (time.monotonic(); by default
    step_time(timeout, all its bytes) from now).
    """
    now = start = time.monotonic()
    for t in transfers:
        t.out_at = t.into_at = 0
        t.last = now
        if t.out is not None:
            t.pump_out()
    live = []
    for t in transfers:
        if t.into is not None:
            t.pump_in()
        if t.out_left or t.into_left:
            live.append(t)
    if not live:
        return
    if deadline is None:
        deadline = start + step_time(timeout, sum(t.nbytes for t in transfers))
    poller = select.poll()
    by_fd = {}
    for t in live:
        poller.register(t.link.fd, t.events)
        by_fd[t.link.fd] = t
    spin_end = min(start + SPIN_S, start + timeout, deadline) if start >= _calm[0] else start
    while live:
        now = time.monotonic()
        if now < spin_end:
            ready = poller.poll(0)
            if not ready:
                os.sched_yield()
                if time.monotonic() - now > LOST_TURN_S:  # another process took the core for its time slice:
                    _calm[0] = now + CALM_S  # sleep instead for a while: the wake-up hands the core back
                    spin_end = now
                continue
        else:
            stalest = min(live, key=_last)
            if stalest.last + timeout <= now:
                what = "sent nothing" if stalest.into_left else "took no data"
                stalest.link.broken = f"{what} for {timeout:g} s"
                raise PeerError(
                    stalest.link, f"{stalest.link.broken} (stalled, stopped or overloaded)", "silent"
                )
            if deadline <= now:
                raise _too_slow(next((t for t in live if t.into_left), live[0]), now - start)
            wait = min(stalest.last + timeout, deadline) - now
            ready = poller.poll(min(wait, _POLL_MAX) * 1000 + 1)
        for fd, ev in ready:
            t = by_fd[fd]
            if ev & select.POLLNVAL:
                raise PeerError(t.link, "is closed")
            if t.out_left and ev & (select.POLLOUT | _POLL_ERR):
                t.pump_out()
            if t.into_left and ev & (select.POLLIN | _POLL_ERR):
                t.pump_in()
            if t.out_left or t.into_left:
                poller.modify(fd, t.events)
            else:
                poller.unregister(fd)
                live.remove(t)


def _last(t: Transfer) -> float:
    return t.last


def _too_slow(t: Transfer, elapsed: float) -> PeerError:
    """The error for a transfer still unfinished at its exchange's deadline."""
    if t.into_left:
        what = f"sent {t.into_at} of {len(t.into)} bytes"
    else:
        what = f"took {t.out_at} of {len(t.out)} bytes"
    t.link.broken = f"{what} in {elapsed:.1f} s"
    return PeerError(t.link, f"{t.link.broken} (trickling, overloaded or a very slow link)", "slow")


def connect(host: str, port: int, name: str, timeout: float) -> Link:
    """A TCP connection to `host:port`; failures become one-line errors naming the peer."""
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except TimeoutError:
        raise DllamaError(f"cannot connect to {name}: no answer within {timeout:g} s") from None
    except ConnectionRefusedError:
        raise DllamaError(
            f"cannot connect to {name}: connection refused (is `dllama worker` running there?)"
        ) from None
    except socket.gaierror as e:
        raise DllamaError(f"cannot connect to {name}: unknown host ({e.strerror})") from None
    except OSError as e:
        raise DllamaError(f"cannot connect to {name}: {e.strerror or e}") from None
    return Link(sock, name)


def parse_address(text: str) -> tuple[str, int]:
    """HOST:PORT (or [IPv6]:PORT) -> (host, port)."""
    host, sep, port = text.strip().rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
        raise DllamaError(f"bad worker address {text!r}: use HOST:PORT, e.g. 10.0.0.2:9990")
    return host, int(port)


class NodeSync:
    """The sync steps of node `graph.slice.node`: called as sync(step, rows) after each segment with one.

    Pipes are the program's host views; the root also assembles the full logits rows in `full_logits`
    from every node's classifier rows (`vocab`, one range per node).
    Each node sends to the workers in ascending order and to the root last, so a stalled worker always leaves
    the root waiting on that worker itself.
    """

    def __init__(
        self,
        graph: Graph,
        program: Program,
        links: dict[int, Link],
        timeout: float,
        vocab: Sequence[tuple[int, int]] = (),
    ):
        cfg, sl = graph.config, graph.slice
        self.me, self.n_nodes, self.timeout = sl.node, sl.n_nodes, timeout
        self.links = links
        self.order = [links[j] for j in sorted(links) if j != 0] + ([links[0]] if 0 in links else [])
        self.peers = [j for j in sorted(links) if j != 0] + ([0] if 0 in links else [])
        self.x = program.pipe("x")
        self.zq = program.pipe("zq").view(np.uint8)
        self.logits = program.pipe("logits")
        max_batch = self.x.shape[0]
        self.slot = self.zq.shape[1] // self.n_nodes
        self.tmp = {j: np.empty((max_batch, self.slot), np.uint8) for j in self.peers}
        s, me = self.slot, self.me
        self.one_row = [  # the decode step's all-to-all, built once: exchange rewinds them
            Transfer(link, out=self.zq[0, me * s : (me + 1) * s], into=self.zq[0, j * s : (j + 1) * s])
            for j, link in zip(self.peers, self.order, strict=True)
        ]
        self.sync_s = 0.0
        if self.me == 0:
            self.vocab = list(vocab)  # every node's classifier rows
            self.full_logits = np.zeros((max_batch, cfg.vocab_size), np.float32)
            self.parts = {k: np.empty((max_batch, b - a), np.float32) for k, (a, b) in enumerate(self.vocab)}

    def __call__(self, step: Sync, rows: int) -> None:
        t0 = time.perf_counter()
        try:
            if step.kind == "broadcast_root":
                self._broadcast(rows)
            elif step.kind == "all_slices":
                self._all_slices(rows)
            elif step.kind == "gather_root":
                self._gather(rows)
            else:
                raise ValueError(f"unknown sync kind {step.kind!r}")
        finally:
            self.sync_s += time.perf_counter() - t0

    def _broadcast(self, rows: int) -> None:
        data = memoryview(self.x[:rows]).cast("B")
        if self.me == 0:
            exchange([Transfer(link, out=data) for link in self.order], self.timeout)
        else:
            exchange([Transfer(self.links[0], into=data)], self.timeout)

    def _all_slices(self, rows: int) -> None:
        s, me, zq = self.slot, self.me, self.zq
        if rows == 1:
            exchange(self.one_row, self.timeout)
            return
        mine = np.ascontiguousarray(zq[:rows, me * s : (me + 1) * s])
        exchange(
            [
                Transfer(link, out=memoryview(mine), into=memoryview(self.tmp[j][:rows]))
                for j, link in zip(self.peers, self.order, strict=True)
            ],
            self.timeout,
        )
        for j in self.peers:
            zq[:rows, j * s : (j + 1) * s] = self.tmp[j][:rows]

    def _gather(self, rows: int) -> None:
        if self.me != 0:
            exchange([Transfer(self.links[0], out=memoryview(self.logits[:rows]))], self.timeout)
            return
        workers = sorted(self.links)
        exchange(
            [Transfer(self.links[k], into=memoryview(self.parts[k][:rows])) for k in workers], self.timeout
        )
        v0, v1 = self.vocab[0]
        self.full_logits[:rows, v0:v1] = self.logits[:rows]
        for k in workers:
            a, b = self.vocab[k]
            self.full_logits[:rows, a:b] = self.parts[k][:rows]
