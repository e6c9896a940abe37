"""HTTP connections with bounds: uvicorn's h11 protocol, plus a header timeout and a cap on open connections.

uvicorn closes a connection that stays idle after a response (``timeout_keep_alive``), but gives a client all
the time it wants to send a request's headers, and accepts every connection: a client that opens thousands
of connections and sends nothing, or stops inside the headers, holds them forever and runs the process out
of file descriptors. Here:

- a connection must deliver a request line and headers within ``header_timeout`` seconds of opening (or of
  its first byte after a response); otherwise it is closed, with a 408 if it had sent part of them. Their
  size is bounded by h11 (``h11_max_incomplete_event_size``, 16 KiB: larger ones are answered 400);
- beyond ``max_connections`` open ones, a new connection is answered 503 at once and closed, unread;
- a request body is timed by ``BodyLimitMiddleware`` (security.py), the one reader of bodies.

The server pins uvicorn's pure-Python h11 implementation, which this class extends: it comes with uvicorn
everywhere (httptools is an optional extra), so every install parses and times requests the same way.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.h11_impl import H11Protocol

from .errors import error_bytes


def _raw_response(status: str, message: str, code: str, extra: str = "") -> bytes:
    body = error_bytes(int(status.split()[0]), message, code=code)
    return (f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"connection: close\r\n{extra}\r\n").encode() + body


class BoundedH11Protocol(H11Protocol):
    """One HTTP/1.1 connection; uvicorn makes one per accepted socket (``run.serve`` binds the two limits)."""

    def __init__(self, *args, header_timeout: float, max_connections: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout, self.max_connections = header_timeout, max_connections
        self.header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:
        if len(self.connections) >= self.max_connections:
            self.transport = transport  # connection_lost closes it
            transport.write(_raw_response(
                "503 Service Unavailable", f"The server holds its limit of {self.max_connections} open connections "
                                           f"(--max-connections); retry shortly.", "too_many_connections",
                "retry-after: 1\r\n"))
            transport.close()
            return
        super().connection_made(transport)
        self._time_headers()

    def data_received(self, data: bytes) -> None:
        if self.header_timer is None and (self.cycle is None or self.cycle.response_complete):
            self._time_headers()  # the first bytes of the next request on a kept-alive connection
        cycle = self.cycle
        super().data_received(data)
        if self.cycle is not cycle:  # its headers are in: a request has begun
            self._stop_timing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_timing()
        super().connection_lost(exc)

    def _time_headers(self) -> None:
        self.header_timer = self.loop.call_later(self.header_timeout, self._headers_late)

    def _stop_timing(self) -> None:
        if self.header_timer is not None:
            self.header_timer.cancel()
            self.header_timer = None

    def _headers_late(self) -> None:
        self.header_timer = None
        if self.transport.is_closing():
            return
        if self.conn.trailing_data[0]:  # part of a request line or headers came, then nothing
            self.transport.write(_raw_response(
                "408 Request Timeout", f"The request line and headers did not arrive within {self.header_timeout:g} "
                                       f"s (--header-timeout).", "request_timeout"))
        self.transport.close()
