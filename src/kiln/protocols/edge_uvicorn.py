"""The edge limits (`edge.py`) on a uvicorn port: the management and metrics ports.

uvicorn has a keep-alive timeout and `limit_concurrency` (503 once the head is
read) but no head deadline, no body idle timeout, and its httptools protocol no
bound on a head: a client could send a 64 MiB header, slowly, before the
management app (and so the API key check) ever ran. `EdgeHttpToolsProtocol`
adds them to uvicorn's own httptools protocol, with the same rules as Kiln's
HTTP layer:

    config = guard_uvicorn(uvicorn.Config(app, ...), EdgeLimits())

Each connection checks its deadlines on its own 0.5 s timer: these ports see
few connections, so simplicity wins over the inference port's single sweep.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httptools
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from kiln.protocols.edge import EVICT_AFTER_S, EdgeLimits, error_body

TICK_S = 0.5


def guard_uvicorn(config: uvicorn.Config, limits: EdgeLimits | None = None) -> uvicorn.Config:
    """`config` with the edge limits: Kiln's guarded httptools protocol, keep-alive, a cap."""
    limits = limits or EdgeLimits()
    config.http = type(
        "EdgeHttpTools",
        (EdgeHttpToolsProtocol,),
        {"limits": limits, "cap": limits.connection_cap()},
    )
    config.timeout_keep_alive = limits.keepalive_timeout_s  # type: ignore[assignment]
    return config


def _response(status: int, phrase: bytes, body: bytes, extra: bytes = b"") -> bytes:
    return b"".join(
        (
            b"HTTP/1.1 %d %s\r\n" % (status, phrase),
            b"content-type: application/json\r\ncontent-length: %d\r\n" % len(body),
            extra,
            b"connection: close\r\n\r\n",
            body,
        )
    )


_431 = _response(
    431,
    b"Request Header Fields Too Large",
    error_body("HeadersTooLarge", "request line and headers are too large"),
)
_408 = _response(
    408, b"Request Timeout", error_body("RequestTimeout", "the request did not arrive in time")
)
_503 = _response(
    503,
    b"Service Unavailable",
    error_body("Unavailable", "too many connections; retry shortly"),
    b"retry-after: 1\r\n",
)


class EdgeHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a head deadline and size, body idle time and a cap."""

    limits: EdgeLimits = EdgeLimits()
    cap: int = EdgeLimits().max_connections

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        now = self.loop.time()
        self.edge_last = self.edge_head_since = self.edge_idle_since = now
        self.edge_in_head = True  # waiting for (the rest of) a head
        self.edge_between = True  # between requests: no byte of a head yet
        self.edge_begins = 0
        self.edge_head_bytes = 0
        self.edge_refused = 0
        self.edge_timer: asyncio.TimerHandle | None = None
        room = self._make_room()
        super().connection_made(transport)
        if not room:
            self.edge_refused = 503
            transport.write(_503)
            transport.close()
            return
        self.edge_timer = self.loop.call_later(TICK_S, self._edge_tick)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.edge_timer is not None:
            self.edge_timer.cancel()
            self.edge_timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.edge_refused:
            return
        self.edge_last = self.loop.time()
        if self.edge_in_head:
            mark = self.edge_begins + 1 if self.edge_between else self.edge_begins
        else:
            mark = -1
        super().data_received(data)
        if self.edge_refused or self.transport.is_closing():
            return
        if self.edge_in_head and not self.edge_between:
            if self.edge_begins == mark:  # the whole piece was head (see fast_http.py)
                self.edge_head_bytes += len(data)
            if self.edge_head_bytes > self.limits.max_header_bytes:
                self._refuse(_431, 431)

    def send_400_response(self, msg: str) -> None:
        if self.edge_refused == 431:  # a head too large, found when it completed
            self.transport.write(_431)
            self.transport.close()
            return
        super().send_400_response(msg)

    def on_message_begin(self) -> None:
        self.edge_in_head = True
        self.edge_between = False
        if self.edge_begins:  # a later request: from its first byte (the first: from connect)
            self.edge_head_since = self.edge_last
        self.edge_begins += 1
        self.edge_head_bytes = 0
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self.edge_in_head = False
        size = len(self.url) + sum(len(n) + len(v) + 4 for n, v in self.headers)
        if size > self.limits.max_header_bytes:
            self.edge_refused = 431
            raise httptools.HttpParserError("head too large")  # uvicorn answers: send_400_response
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self.edge_in_head = self.edge_between = True
        super().on_message_complete()

    def on_response_complete(self) -> None:
        self.edge_idle_since = self.loop.time()
        super().on_response_complete()

    # the limits

    def _refuse(self, response: bytes, status: int) -> None:
        self.edge_refused = status
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True  # the app's later sends are dropped
            cycle.message_event.set()
        self.transport.write(response)
        self.transport.close()

    def edge_waiting(self) -> bool:
        cycle = self.cycle
        return (
            self.edge_in_head
            and not self.edge_refused
            and (cycle is None or cycle.response_complete)
            and not self.pipeline
        )

    def _make_room(self) -> bool:
        """At the cap, close the longest-waiting idle or slow-head connection, as fast_http does."""
        if len(self.connections) < self.cap:
            return True
        cutoff = self.loop.time() - EVICT_AFTER_S
        victim: Any = None
        for other in self.connections:
            if not isinstance(other, EdgeHttpToolsProtocol) or not other.edge_waiting():
                continue
            since = max(other.edge_idle_since, other.edge_head_since)
            if since <= cutoff and (
                victim is None or since < max(victim.edge_idle_since, victim.edge_head_since)
            ):
                victim = other
        if victim is None:
            return False
        self.connections.discard(victim)
        victim.transport.close()
        return True

    def _edge_tick(self) -> None:
        self.edge_timer = None
        if self.transport.is_closing() or self.edge_refused:
            return
        if self.transport.get_protocol() is not self:
            return  # upgraded (WebSocket): no longer an HTTP request's connection
        now = self.loop.time()
        limits = self.limits
        cycle = self.cycle
        busy = cycle is not None and not cycle.response_complete
        if not self.edge_in_head:  # a body is arriving
            if not self.flow.read_paused and now - self.edge_last > limits.body_idle_timeout_s:
                if cycle is not None and (cycle.response_started or cycle.response_complete):
                    self.edge_refused = 408
                    if not cycle.response_complete:
                        cycle.disconnected = True
                        cycle.message_event.set()
                    self.transport.close()  # an answer began: its client sees it cut
                else:
                    self._refuse(_408, 408)
                return
        elif not busy and not self.pipeline:
            if self.edge_between and self.edge_begins:  # idle keep-alive ("\r\n" keeps no one)
                if now - self.edge_idle_since > limits.keepalive_timeout_s:
                    self.transport.close()
                    return
            elif now - self.edge_head_since > limits.header_timeout_s:
                if self.edge_between:
                    self.transport.close()  # not a byte of a request: nothing to answer
                else:
                    self._refuse(_408, 408)
                return
        self.edge_timer = self.loop.call_later(TICK_S, self._edge_tick)
