"""The wire format and the transport's exchange, without worker processes."""

from __future__ import annotations

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
    Msg,
    ProtocolError,
    Role,
    SessionConfig,
    pack_forward,
    pack_frame,
    pack_greeting,
    parse_greeting_head,
    parse_header,
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
        timeout=3.0,
        heartbeat=1.0,
        weight_bytes=1234,
        peers=[("10.0.0.2", 9990), ("10.0.0.3", 9991)],
        model=CFG,
        slice=node_slice(CFG, 1, 3),
    )
    return SessionConfig(**{**base, **kw})


def test_session_config_round_trip():
    sc = session()
    back = SessionConfig.from_bytes(sc.to_bytes(), "root")
    assert back == sc
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
        dict(timeout=0.0),
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
    for bad in ("10.0.0.2", "10.0.0.2:", ":9990", "a:0", "a:65536", "a:x"):
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
