"""Regression: an exchange into a 2-D byte buffer (the all-to-all sync of f32 slots over several rows) must
count bytes, not rows, when the peer's data arrives in pieces."""

from __future__ import annotations

import socket
import threading
import time

import numpy as np

from net.transport import Link, Transfer, exchange


def _pair() -> tuple[Link, Link]:
    with socket.create_server(("127.0.0.1", 0)) as srv:
        a = socket.create_connection(srv.getsockname())
        b, _ = srv.accept()
    return Link(a, "peer b"), Link(b, "peer a")


def _dribble(link: Link, data: bytes, pieces: list[int]) -> None:
    """Send `data` in pieces of the given sizes with a pause between them, as a busy peer would."""
    at = 0
    for size in pieces:
        link.send(data[at : at + size], 5)
        at += size
        time.sleep(0.1)
    link.send(data[at:], 5)


def _receive_in_pieces(buf: np.ndarray, pieces: list[int]) -> tuple[np.ndarray, bytes, bytes]:
    a, b = _pair()
    sent = np.random.default_rng(1).integers(0, 256, buf.nbytes, np.uint8).tobytes()
    t = threading.Thread(target=_dribble, args=(a, sent + b"\x08" * 8, pieces))
    t.start()
    exchange([Transfer(b, into=memoryview(buf))], 5)
    t.join(5)
    rest = b.recv_exact(8, 5)  # what follows the rows in the stream, e.g. the next frame header
    a.close()
    b.close()
    return buf, sent, rest


def test_two_d_byte_rows_arriving_in_two_pieces_are_received_whole():
    """First piece longer than the row count: a row-counted view ended the exchange early (stream desync)."""
    buf, sent, rest = _receive_in_pieces(np.zeros((32, 2304), np.uint8), [65483])
    assert buf.tobytes() == sent
    assert rest == b"\x08" * 8


def test_two_d_byte_rows_arriving_byte_by_byte_at_first_land_in_place():
    """First pieces shorter than the row count: a row-counted view wrote later bytes into the wrong rows."""
    buf, sent, rest = _receive_in_pieces(np.zeros((16, 96), np.uint8), [3, 5, 700])
    assert buf.tobytes() == sent
    assert rest == b"\x08" * 8


def test_two_d_float_rows_are_received_whole():
    buf, sent, rest = _receive_in_pieces(np.zeros((8, 40), np.float32), [333])
    assert buf.tobytes() == sent
    assert rest == b"\x08" * 8
