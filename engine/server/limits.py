"""Bounds on slow or idle HTTP clients, which uvicorn alone does not close.

uvicorn closes a keep-alive connection that stays idle after a response (`timeout_keep_alive`) but waits
forever for the first request of a connection, and for a request whose bytes trickle in (one header byte per
second keeps it open). `bounded_protocol` gives its h11 protocol a deadline: the request line and headers must
arrive within `head_timeout` seconds of the connection opening or of the previous response, else the
connection is closed. The body is bounded in the app (`app.read_body`).
"""

from __future__ import annotations

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


class _BoundedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request head."""

    head_timeout: float = 30.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_deadline: asyncio.TimerHandle | None = None
        self._arm_head_deadline()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # a whole request head has arrived
            self._disarm_head_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.conn.their_state is h11.IDLE:  # waiting for the next request (not one already pipelined)
            self._arm_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_deadline()
        super().connection_lost(exc)

    def _arm_head_deadline(self) -> None:
        self._disarm_head_deadline()
        if not self.transport.is_closing():
            self._head_deadline = self.loop.call_later(self.head_timeout, self._head_too_slow)

    def _disarm_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_too_slow(self) -> None:
        self._head_deadline = None
        if not self.transport.is_closing():
            self.transport.close()


def bounded_protocol(head_timeout: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol class, closing connections whose request head takes over `head_timeout` s."""
    return type("BoundedH11Protocol", (_BoundedH11Protocol,), {"head_timeout": head_timeout})
