"""The wire format and the transport's exchange, without worker processes."""

from __future__ import annotations

import json
import socket
import struct
import threading
import time

import numpy as np
import pytest

from engine.config import ModelConfig, RopeScaling
from engine.errors import DllamaError
from engine.slicing import node_slice
from net.protocol import (
    GREETING,
    MAGIC,
    PROTOCOL_VERSION,
    Frame,
    Msg,
    ProtocolError,
    Role,
    SessionConfig,
    check_timeout,
    describe,
    error_text,
    json_depth,
    pack_forward,
    pack_forward_rows,
    pack_frame,
    pack_greeting,
    parse_forward_rows,
    parse_greeting_head,
    parse_header,
    parse_json,
    printable,
    step_time,
)
from net.transport import Link, PeerError, Transfer, exchange, parse_address

CFG = ModelConfig("llama", 256, 320, 2, 8, 8, 32, 288, 256, rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192))


def tcp_pair() -> tuple[Link, Link]:
    with socket.create_server(("127.0.0.1", 0)) as srv:
        a = socket.create_connection(srv.getsockname())
        b, _ = srv.accept()
    return Link(a, "peer b"), Link(b, "peer a")  # a link is named after the node at its far end


def test_greeting_layout():
    g = pack_greeting(Role.ROOT, {"device": "x"})
    assert g[:4] == MAGIC == b"DLMA"
    assert struct.unpack_from("<HB", g, 4) == (PROTOCOL_VERSION, Role.ROOT)  # version always at offset 4
    head = parse_greeting_head(g[: GREETING.size], "p")
    assert head == (PROTOCOL_VERSION, Role.ROOT, len(g) - GREETING.size)
    assert parse_greeting_head(pack_greeting(Role.WORKER, {}, version=7)[: GREETING.size], "p")[0] == 7


def test_foreign_and_oversize_greetings_are_refused():
    with pytest.raises(ProtocolError, match=r"10\.0\.0\.9:22 is not a dllama node \(it sent b'SSH-2.0-Open'"):
        parse_greeting_head(b"SSH-2.0-Open", "10.0.0.9:22")
    huge = GREETING.pack(MAGIC, PROTOCOL_VERSION, Role.ROOT, 0, 5000)
    with pytest.raises(ProtocolError, match="greeting of 5000 bytes, over the 4096-byte bound"):
        parse_greeting_head(huge, "p")


def test_forward_message_is_eight_bytes():
    raw = pack_forward(pos=70000, n_tokens=32, mode="last")
    assert len(raw) == 8  # the original's per-forward control packet is 8 bytes too (spec 5.5)
    assert parse_header(raw, "p") == (Msg.FORWARD, 1, 32, 70000)


def test_forward_rows_layout_by_hand():
    """FORWARD_ROWS: type 11, mode, rows, payload length, then the positions and the slots as int32 LE."""
    raw = pack_forward_rows([5, 0, 63], [2, 0, 1], "all")
    want = bytes([11, 2, 3, 0, 24, 0, 0, 0])  # type, mode "all", 3 rows (u16), 24 payload bytes (u32)
    want += bytes([5, 0, 0, 0, 0, 0, 0, 0, 63, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0])
    assert raw == want and len(raw) == 8 + 8 * 3
    msg, a, b, c = parse_header(raw[:8], "p")
    mode, pos, slots = parse_forward_rows(Frame(msg, a, b, c, raw[8:]), 4, 64, 3, "the root")
    assert (mode, pos.tolist(), slots.tolist()) == ("all", [5, 0, 63], [2, 0, 1])


def _rows(payload: bytes, a: int = 2, b: int = 3) -> Frame:
    return Frame(Msg.FORWARD_ROWS, a, b, len(payload), payload)


@pytest.mark.parametrize(
    "frame, want",
    [
        (_rows(struct.pack("<6i", 0, 1, 2, 0, 3, 1)), "row 1 the KV slot 3, outside this session's 0..2"),
        (_rows(struct.pack("<6i", 0, 1, 2, 0, -1, 1)), "row 1 the KV slot -1, outside"),
        (_rows(struct.pack("<6i", 0, 64, 2, 0, 0, 0)), "row 1 the position 64, outside this session's 0..63"),
        (_rows(struct.pack("<6i", -7, 1, 2, 0, 0, 0)), "row 0 the position -7, outside"),
        (_rows(struct.pack("<5i", 0, 1, 2, 0, 0)), "FORWARD_ROWS of 20 bytes for 3 rows \\(needs 24\\)"),
        (_rows(struct.pack("<8i", 0, 1, 2, 3, 0, 0, 0, 0)), "FORWARD_ROWS of 32 bytes for 3 rows"),
        (_rows(struct.pack("<10i", *range(5), *[0] * 5), b=5), "out of range \\(mode 2, 5 rows\\)"),
        (_rows(b"", b=0), "out of range \\(mode 2, 0 rows\\)"),
        (_rows(struct.pack("<6i", 0, 1, 2, 0, 0, 0), a=3), "out of range \\(mode 3, 3 rows\\)"),
    ],
)
def test_forward_rows_out_of_range_are_refused(frame, want):
    """Every value of a FORWARD_ROWS is checked against the session (4 rows, 64 positions, 3 slots)."""
    with pytest.raises(ProtocolError, match=want):
        parse_forward_rows(frame, 4, 64, 3, "the root")


def test_forward_rows_payload_bound():
    """The header bound: 65535 rows of 8 bytes; a longer payload is refused before it is read."""
    assert parse_header(struct.pack("<BBHI", Msg.FORWARD_ROWS, 2, 1, 8 * 65535), "p")[3] == 8 * 65535
    with pytest.raises(ProtocolError, match="FORWARD_ROWS message of 524281 bytes, over its 524280-byte"):
        parse_header(struct.pack("<BBHI", Msg.FORWARD_ROWS, 2, 1, 8 * 65535 + 1), "root")


def test_frame_bounds():
    assert parse_header(pack_frame(Msg.CONFIG, b"x" * 100)[:8], "p") == (Msg.CONFIG, 0, 0, 100)
    with pytest.raises(ProtocolError, match="CONFIG message of 65537 bytes, over its 65536-byte bound"):
        parse_header(struct.pack("<BBHI", Msg.CONFIG, 0, 0, 65537), "root")
    with pytest.raises(ProtocolError, match="sent a PING message of 1 bytes, over its 0-byte bound"):
        parse_header(struct.pack("<BBHI", Msg.PING, 0, 0, 1), "root")
    with pytest.raises(ProtocolError, match="unknown message type 200"):
        parse_header(struct.pack("<BBHI", 200, 0, 0, 0), "root")
    with pytest.raises(ValueError):
        pack_frame(Msg.ERROR, b"x" * 5000)


def session(**kw) -> SessionConfig:
    base = dict(
        session="abc",
        node=1,
        n_nodes=3,
        act="q80",
        max_seq_len=128,
        max_batch=32,
        kv_type="f16",
        timeout=3.0,
        heartbeat=1.0,
        weight_bytes=1234,
        cache_key="0123456789abcdef" * 4,
        peers=[("10.0.0.2", 9990), ("10.0.0.3", 9991)],
        model=CFG,
        slice=node_slice(CFG, 1, 3),
        n_slots=3,
    )
    return SessionConfig(**{**base, **kw})


def test_session_config_round_trip():
    sc = session()
    back = SessionConfig.from_bytes(sc.to_bytes(), "root")
    assert back == sc and back.n_slots == 3
    assert back.model.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 8192)


@pytest.mark.parametrize(
    "bad",
    [
        dict(node=3),
        dict(node=0),
        dict(act="f16"),
        dict(max_seq_len=1000),
        dict(peers=[("a", 1)]),
        dict(max_batch=0),
        dict(kv_type="q80"),
        dict(timeout=0.0),
        dict(n_slots=0),
        dict(n_slots=33),  # more slots than rows in a batch
    ],
)
def test_session_config_out_of_range(bad):
    with pytest.raises(ProtocolError, match="out of range"):
        SessionConfig.from_bytes(session(**bad).to_bytes(), "root")


def test_session_config_garbage():
    with pytest.raises(ProtocolError, match="not a JSON object"):
        SessionConfig.from_bytes(b"\xff\x00", "root")
    with pytest.raises(ProtocolError, match="incomplete session config"):
        SessionConfig.from_bytes(b'{"session": "x"}', "root")
    bad_model = session().to_bytes().replace(b'"n_kv_heads":8', b'"n_kv_heads":3')  # 8 heads % 3 != 0
    with pytest.raises(ProtocolError, match="model config this worker cannot use"):
        SessionConfig.from_bytes(bad_model, "root")
    bad_arch = session().to_bytes().replace(b'"arch":"llama"', b'"arch":"gemma"')
    with pytest.raises(ProtocolError, match="model config this worker cannot use"):
        SessionConfig.from_bytes(bad_arch, "root")
    bad_slice = session().to_bytes().replace(b'"ffn":[128,224]', b'"ffn":[224,128]')
    assert bad_slice != session().to_bytes()
    with pytest.raises(ProtocolError, match="node slice this worker cannot use"):
        SessionConfig.from_bytes(bad_slice, "root")


def test_parse_address():
    assert parse_address("10.0.0.2:9990") == ("10.0.0.2", 9990)
    assert parse_address("node-a.lan:1") == ("node-a.lan", 1)
    assert parse_address("[::1]:9990") == ("::1", 9990)
    for bad in ("10.0.0.2", "10.0.0.2:", ":9990", "a:0", "a:65536", "a:x", "a:²"):
        with pytest.raises(DllamaError, match="bad worker address"):
            parse_address(bad)


def test_exchange_moves_more_than_the_socket_buffers_both_ways():
    """Both ends send 16 MB at once: blocking send-then-receive would deadlock on full buffers."""
    a, b = tcp_pair()
    rng = np.random.default_rng(0)
    from_a, from_b = rng.integers(0, 256, 16 << 20, np.uint8), rng.integers(0, 256, 16 << 20, np.uint8)
    at_b, at_a = np.zeros_like(from_a), np.zeros_like(from_b)
    t = threading.Thread(target=exchange, args=([Transfer(b, out=from_b, into=memoryview(at_b))], 10))
    t.start()
    exchange([Transfer(a, out=from_a, into=memoryview(at_a))], 10)
    t.join(10)
    assert np.array_equal(at_b, from_a) and np.array_equal(at_a, from_b)
    assert a.sent == b.recv == a.recv == b.sent == 16 << 20


def test_a_reused_transfer_moves_its_bytes_again_without_polling_when_they_are_there(monkeypatch):
    """The decode step's exchange is built once and rewound; data already waiting costs no poll() at all."""
    a, b = tcp_pair()
    at_a = np.zeros(8, np.uint8)
    step = [Transfer(a, out=np.arange(4, dtype=np.uint8), into=memoryview(at_a))]
    for k in (1, 2):
        b.send(np.full(8, k, np.uint8), 5)
        time.sleep(0.05)
        with monkeypatch.context() as m:
            m.setattr("net.transport.select.poll", lambda: pytest.fail("polled for bytes already there"))
            exchange(step, 5)
        assert np.all(at_a == k) and b.recv_exact(4, 5) == bytes(range(4))
    assert a.sent == 8 and a.recv == 16


def test_a_waiting_exchange_polls_before_it_sleeps_and_still_times_out(monkeypatch):
    """While nothing arrives the exchange polls without sleeping for SPIN_S, then waits in poll() until the
    silence bound, which still ends it."""
    import net.transport as transport

    a, b = tcp_pair()
    timeouts = []

    real_poll = transport.select.poll

    def poll():
        p = real_poll()

        class Wrapped:
            register, modify, unregister = p.register, p.modify, p.unregister

            def poll(self, ms=None):
                timeouts.append(ms)
                return p.poll(ms)

        return Wrapped()

    monkeypatch.setattr("net.transport.select.poll", poll)
    monkeypatch.setattr("net.transport._calm", [0.0])  # no earlier lost turn in this process counts
    monkeypatch.setattr("net.transport.os.sched_yield", lambda: None)
    t0 = time.monotonic()
    with pytest.raises(PeerError, match="sent nothing for 0.2 s"):
        b.recv_exact(1, 0.2)
    assert 0.2 <= time.monotonic() - t0 < 2
    spins = [t for t in timeouts if t == 0]
    assert spins and timeouts[: len(spins)] == spins  # polled first, slept after
    assert any(t > 0 for t in timeouts)


def test_a_yield_that_lost_the_core_stops_the_spinning_for_a_while(monkeypatch):
    """When a yield inside the polling phase comes back only after another process's time slice, the
    exchange sleeps instead, and so do the next ones for CALM_S (their wake-ups then get the core back)."""
    import net.transport as transport

    a, b = tcp_pair()
    real_poll, zero_polls = transport.select.poll, []

    def poll():
        p = real_poll()

        class Counting:
            register, modify, unregister = p.register, p.modify, p.unregister

            def poll(self, ms=None):
                zero_polls.extend([ms] if ms == 0 else [])
                return p.poll(ms)

        return Counting()

    monkeypatch.setattr("net.transport.select.poll", poll)
    monkeypatch.setattr("net.transport._calm", [0.0])
    monkeypatch.setattr("net.transport.os.sched_yield", lambda: time.sleep(2 * transport.LOST_TURN_S))
    for _ in range(3):
        with pytest.raises(PeerError, match="sent nothing"):
            b.recv_exact(1, 0.05)
    assert len(zero_polls) == 1  # one poll, one yield that lost the core, then no more spinning
    assert transport._calm[0] > time.monotonic() + transport.CALM_S / 2


def test_silent_peer_times_out_naming_it():
    a, b = tcp_pair()
    t0 = time.monotonic()
    with pytest.raises(PeerError, match=r"peer a sent nothing for 0\.3 s"):
        b.recv_exact(10, 0.3)
    assert 0.25 < time.monotonic() - t0 < 2


def test_closed_peer_is_reported_at_once():
    a, b = tcp_pair()
    a.send(b"12345", 1)
    a.close()
    with pytest.raises(PeerError, match="peer a closed the connection"):
        b.recv_exact(10, 5)
    assert b.recv == 5


def test_read_frame_skips_pings_and_reads_payloads():
    a, b = tcp_pair()
    a.send(pack_frame(Msg.PING) * 3 + pack_frame(Msg.ERROR, b"boom"), 1)
    f = b.read_frame(1)
    assert (f.msg, f.payload) == (Msg.ERROR, b"boom")
    a.send(pack_frame(Msg.ERROR, b"no such model"), 1)
    with pytest.raises(DllamaError, match="peer a: no such model"):
        b.expect(Msg.OK, 1)


# ---- limits on what a peer may send ----
def test_deep_nesting_is_refused_before_the_parser_recurses():
    t0 = time.monotonic()
    with pytest.raises(ProtocolError, match="greeting nested 60000 levels deep, over the bound of 8"):
        parse_json(b"[" * 60000 + b"]" * 60000, "greeting", "p")
    with pytest.raises(ProtocolError, match="nested 9 levels deep"):
        parse_json(b'{"a":' * 9 + b"1" + b"}" * 9, "greeting", "p")
    assert time.monotonic() - t0 < 1
    assert parse_json(b'{"a":' * 8 + b"1" + b"}" * 8, "greeting", "p")  # 8 levels are fine
    assert json_depth(b'{"s": "[[[[\\"{{{{"}') == 1  # brackets in strings, escaped quotes, do not count
    assert parse_json(b'{"s": "[[[[[[[[[[[[[[[[[["}', "greeting", "p") == {"s": "[" * 18}


@pytest.mark.parametrize(
    "raw, why",
    [
        (b'{"n": ' + b"7" * 5000 + b"}", "an integer of 5000 digits"),
        (b'{"n": NaN}', "the number NaN"),
        (b'{"n": -Infinity}', "the number -Infinity"),
        (b'{"n": 1e999}', "the number 1e999"),
        (b'{"n": 0.' + b"5" * 40 + b"}", "the number 0.555"),
    ],
)
def test_huge_and_non_finite_numbers_are_refused(raw, why):
    with pytest.raises(
        ProtocolError, match=f"p sent a greeting with {why}.*: numbers must be finite and short"
    ):
        parse_json(raw, "greeting", "p")


def test_json_that_is_not_an_object_or_not_text():
    for raw in (b"[1, 2]", b'"x"', b"\xff\xfe\x00", b'{"a": 1', b"", b"\x00" * 100):
        with pytest.raises(ProtocolError, match="p sent a greeting that is not a JSON object"):
            parse_json(raw, "greeting", "p")


def test_a_peers_words_are_made_one_short_printable_line():
    caps = {"device": "GPU\n⭕ Waiting for a root\x1b[2J", "host": "h\ud800", "memory": 2**31}
    line = describe(caps)
    assert line == "GPU ⭕ Waiting for a root [2J on h , 2.0 GiB free"
    assert printable("x" * 300, 10) == "x" * 10 + "..."
    assert error_text(b"bad\r\nthing\x07") == "bad  thing "


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), 0, -1.0, 3601, "3", None, True])
def test_net_timeout_must_be_finite_positive_and_bounded(bad):
    with pytest.raises(DllamaError, match=r"--net-timeout must be a number of seconds in \(0, 3600\]"):
        check_timeout(bad)


def test_net_timeout_in_range_is_kept():
    assert check_timeout(0.05) == 0.05 and check_timeout(3600) == 3600.0


def test_step_time_is_the_silence_plus_the_bytes_at_the_minimum_rate():
    assert step_time(3.0, 0) == 3.0
    assert step_time(3.0, 2 << 20) == 5.0  # 2 MiB at 1 MiB/s


@pytest.mark.parametrize(
    "bad",
    [
        dict(timeout=1e9),
        dict(heartbeat=0.0),
        dict(heartbeat=1e-9),
        dict(peers=[("10.0.0.2", 9990), ("bad\nhost", 9991)]),
        dict(peers=[("10.0.0.2", 9990), ("10.0.0.3", 70000)]),
        dict(weight_bytes=-1),
        dict(cache_key="abc"),
        dict(cache_key="G" * 64),
        dict(cache_key="0" * 65),
        dict(session=""),
        dict(n_nodes=9, peers=[("h", 1)] * 8, slice=node_slice(CFG, 1, 8)),  # 9 nodes, 8 heads
    ],
)
def test_session_config_values_out_of_range(bad):
    with pytest.raises(ProtocolError, match="out of range"):
        SessionConfig.from_bytes(session(**bad).to_bytes(), "root")


def test_session_config_fields_of_the_wrong_type():
    good = json.loads(session().to_bytes())
    for key, value in [("node", True), ("node", 1.0), ("timeout", "3"), ("session", 7), ("peers", "ab")]:
        raw = json.dumps({**good, key: value}).encode()
        with pytest.raises(ProtocolError, match="incomplete session config"):
            SessionConfig.from_bytes(raw, "root")


@pytest.mark.parametrize(
    "field, value, why",
    [
        ("n_layers", 0, "n_layers 0 is out of range"),
        ("n_layers", 10**9, "n_layers 1000000000 is out of range"),
        ("dim", -5, "dim -5 is out of range"),
        ("head_dim", 31, "head_dim 31 is odd"),
        ("norm_eps", 0.0, "norm_eps 0.0 must be a finite number above 0"),
        ("vocab_size", "288", "vocab_size '288' is not an integer"),
    ],
)
def test_the_model_config_is_validated_like_a_model_files(field, value, why):
    d = json.loads(session().to_bytes())
    d["model"][field] = value
    with pytest.raises(ProtocolError, match=f"root sent a model config this worker cannot use: {why}"):
        SessionConfig.from_bytes(json.dumps(d).encode(), "root")


def test_an_unknown_model_field_is_refused():
    d = json.loads(session().to_bytes())
    d["model"]["n_dragons"] = 3
    with pytest.raises(ProtocolError, match="root sent a model config this worker cannot use"):
        SessionConfig.from_bytes(json.dumps(d).encode(), "root")


@pytest.mark.parametrize(
    "key, value",
    [("kv_heads", [2, 9]), ("q_heads", [0, 4]), ("vocab", [0, 289]), ("ffn", [0, 321]), ("kv_heads", [3, 3])],
)
def test_a_slice_outside_the_model_is_refused(key, value):
    d = json.loads(session().to_bytes())  # node 1 of 3: KV heads [3, 6), query heads [3, 6) of 8
    d["slice"][key] = value
    with pytest.raises(ProtocolError, match="node slice this worker cannot use"):
        SessionConfig.from_bytes(json.dumps(d).encode(), "root")


# ---- every wait is bounded in total, not only in silence ----
def trickle(link: Link, data: bytes, every: float, stop: threading.Event) -> threading.Thread:
    """Send `data` one byte at a time, `every` seconds apart, until done or `stop` is set."""

    def run() -> None:
        for i in range(len(data)):
            if stop.wait(every):
                return
            try:
                link.send(data[i : i + 1], 1)
            except PeerError:
                return

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_a_trickling_peer_is_given_up_at_the_step_deadline():
    """One byte every 0.1 s is never silent for the 0.5 s bound, but 100 bytes need 10 s."""
    a, b = tcp_pair()
    stop = threading.Event()
    trickle(a, b"x" * 100, 0.1, stop)
    t0 = time.monotonic()
    with pytest.raises(PeerError, match=r"peer a sent (\d+) of 100 bytes in 0\.5 s \(trickling") as ei:
        b.recv_exact(100, 0.5)
    stop.set()
    assert ei.value.kind == "slow" and b.broken
    assert 0.45 < time.monotonic() - t0 < 1.5
    assert 1 <= int(ei.value.reason.split()[1]) < 10


def test_an_explicit_deadline_bounds_several_steps_together():
    a, b = tcp_pair()
    stop = threading.Event()
    trickle(a, b"y" * 50, 0.05, stop)
    deadline = time.monotonic() + 0.6
    got = b.recv_exact(4, 1.0, deadline)  # arrives in ~0.2 s
    with pytest.raises(PeerError, match="sent .* of 40 bytes"):
        b.recv_exact(40, 1.0, deadline)  # would need 2 s more
    stop.set()
    assert got == b"yyyy"
    assert time.monotonic() - deadline < 0.5


def test_a_peer_that_only_pings_is_given_up_after_the_total_wait():
    a, b = tcp_pair()
    stop = threading.Event()
    trickle(a, pack_frame(Msg.PING) * 100, 0.0, stop)  # a steady stream of whole PING frames
    t0 = time.monotonic()
    with pytest.raises(PeerError, match=r"peer a gave no answer within 0\.4 s \(only keep-alives\)"):
        b.expect(Msg.OK, 5.0, total=0.4)
    stop.set()
    assert 0.35 < time.monotonic() - t0 < 1.5


def test_a_peers_error_text_becomes_one_line():
    a, b = tcp_pair()
    a.send(pack_frame(Msg.ERROR, b"first\nTraceback (most recent call last):\n  x\x1b[0m"), 1)
    with pytest.raises(DllamaError) as ei:
        b.expect(Msg.OK, 1)
    assert "\n" not in str(ei.value) and "\x1b" not in str(ei.value)
    assert str(ei.value) == "peer a: first Traceback (most recent call last):   x [0m"


def test_a_silent_peer_is_reported_as_silent_even_with_a_total_wait():
    a, b = tcp_pair()
    with pytest.raises(PeerError, match=r"peer a sent nothing for 0\.3 s") as ei:
        b.read_frame(0.3, total=5.0)
    assert ei.value.kind == "silent"
