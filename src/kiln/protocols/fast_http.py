"""Kiln's own HTTP/1.1 layer for the inference port: httptools driving the ASGI app directly.

Why not uvicorn here: on a 2-vCPU box the gateway process is the bottleneck,
and about a third of its time went to uvicorn's generic HTTP work (header
validation regexes, a per-request cycle object and `asyncio.Event`, two
socket writes per response). This layer keeps the same ASGI contract, so
`InferenceApp` and every adapter run unchanged, but:

- `http.response.start` is buffered and written together with the body, so a
  complete answer is ONE `transport.write` (one system call), and while other
  requests are in progress the answers finished in one loop turn are written
  back to back in the next (`fast_http_exchange.Outbox`);
- a body that already arrived is handed to `receive()` without waiting on
  anything, and nothing is allocated for waiting unless the app must wait;
- streamed answers (`more_body=True`: chunked, SSE) still leave chunk by chunk.

The edge limits (`edge.py`: head deadline, body idle time, keep-alive, head
size, connection cap) are checked here against timestamps the connection keeps
anyway; one timer in `fast_http_server.py` sweeps all connections, so no
request pays for a timer. The listening side (connections, the `date` header,
graceful shutdown) is in `fast_http_server.py`, one request's `receive`/`send` in
`fast_http_exchange.py`; the management and metrics ports stay on
uvicorn, where generality matters more than microseconds.
"""

from __future__ import annotations

import asyncio
import sys
import traceback
from collections import deque
from typing import Any, Protocol
from urllib.parse import unquote

import httptools

from kiln.protocols.edge import EdgeLimits, error_body
from kiln.protocols.fast_http_exchange import HIGH_WATER, LINGER_S, STATUS_LINES, Exchange, Outbox
from kiln.serving.polling import ACTIVITY

_MALFORMED = error_body("InvalidInput", "malformed HTTP request")
_HEAD_TOO_LARGE = error_body("HeadersTooLarge", "request line and headers are too large")
_TOO_SLOW = error_body("RequestTimeout", "the request did not arrive in time")
_TOO_MANY = error_body("Unavailable", "too many connections; retry shortly")


class ConnectionHost(Protocol):
    """What a connection needs of its server (fast_http_server.FastHttpServer), named here
    so this module need not import the server that imports it."""

    app: Any
    loop: asyncio.AbstractEventLoop
    limits: EdgeLimits
    connections: set[FastHttpProtocol]
    tasks: set[asyncio.Task[None]]
    date_line: bytes
    outbox: Outbox

    def admit(self, conn: FastHttpProtocol) -> bool: ...


class FastHttpProtocol(asyncio.Protocol):
    """One client connection: parses requests, runs them one at a time, writes answers."""

    def __init__(self, server: ConnectionHost) -> None:
        self.server = server
        self.app = server.app
        self.loop = server.loop
        self.parser = httptools.HttpRequestParser(self)
        try:  # answer the first of pipelined requests even when later bytes are bad
            self.parser.set_dangerous_leniencies(lenient_data_after_close=True)
        except AttributeError:  # pragma: no cover - httptools < 0.6.3
            pass
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.peer: tuple[str, int] | None = None
        self.local: tuple[str, int] | None = None
        self.running: Exchange | None = None  # the request whose app task runs
        self.parsing: Exchange | None = None  # the request whose body is being parsed
        self.pending: deque[Exchange] = deque()  # pipelined requests, in order
        self.read_paused = False
        self.write_paused = False
        self._drain: asyncio.Future[None] | None = None
        self.closing = False  # graceful shutdown: finish the request in flight, then close
        # malformed (400) or too large a head (431): answered once the one in flight is done
        self.broken = 0
        self.lingering: asyncio.TimerHandle | None = None
        self.last_active = 0.0  # the last bytes from the client (body idle time)
        self.head_since = 0.0  # the head being waited for: since connect or its first byte
        self.idle_since = 0.0  # the last answer written (keep-alive idle time)
        self.max_head = server.limits.max_header_bytes
        # per-request parser state
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._expect = False
        self._declared: int | None = None
        self._in_head = True  # waiting for (the rest of) a request line and headers
        self._between = True  # the parser is between requests: the next byte starts a head
        self._begins = 0  # requests begun on this connection
        self._head_bytes = 0  # bytes of the head in progress counted so far (see data_received)
        self._head_span = 0  # bytes of the pieces the head arrived in: at least its size
        self._piece = 0  # the length of the piece being parsed

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.peer = _address(transport.get_extra_info("peername"))
        self.local = _address(transport.get_extra_info("sockname"))
        self.last_active = self.head_since = self.idle_since = self.loop.time()
        if not self.server.admit(self):
            self._answer_error(503, _TOO_MANY, b"retry-after: 1\r\n", linger=False)
            return
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        for ex in (self.running, self.parsing, *self.pending):
            if ex is not None and not ex.complete:
                ex.disconnected = True
                ex.wake()
        running = self.running
        if running is not None and not running.complete and running.task is not None:
            # The client is gone (it closed, or half-closed: EOF counts as leaving, as in
            # uvicorn): nobody will read the answer, so stop the work. A queued request is
            # then dropped before it reaches a worker; a running one's answer is discarded.
            running.task.cancel()
        self.pending.clear()
        self.write_paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        if self.lingering is not None:
            self.lingering.cancel()

    def data_received(self, data: bytes) -> None:
        if self.lingering is not None or self.broken:
            return  # answered and closing: read and drop
        self.last_active = self.loop.time()
        # A head still incomplete after this piece is bounded (httptools has no limit), so a
        # client cannot grow it forever. Counted are only pieces known to be all head: one
        # that began inside the head, or between requests with exactly one request begun in
        # it; a piece holding the end of a body and a new head's start is not counted (it is
        # one read at most), so a body is never taken for head bytes.
        self._piece = n = len(data)
        if not self._in_head:
            mark = -1
        elif self._between:
            mark = self._begins + 1
        else:
            mark = self._begins
            self._head_span += n
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass  # no protocol upgrades here: the request is answered as plain HTTP
        except httptools.HttpParserError:
            if not self.broken:
                self.malformed()
            return
        if self._in_head and not self._between:
            if self._begins == mark:
                self._head_bytes += n
            if self._head_bytes > self.max_head:
                self.malformed(431)

    def eof_received(self) -> bool | None:
        return None  # close our side too: connection_lost follows and cancels the request

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    async def drain(self) -> None:
        """Wait until the transport's write buffer drained below its low-water mark."""
        if self._drain is None or self._drain.done():
            self._drain = self.loop.create_future()
        await self._drain

    def pause_reading(self) -> None:
        if not self.read_paused and not self.transport.is_closing():
            self.read_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.read_paused and not self.transport.is_closing():
            self.read_paused = False
            self.transport.resume_reading()

    # httptools callbacks

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = []
        self._expect = False
        self._declared = None
        self._head_bytes = 0
        self._head_span = self._piece
        self._in_head = True
        self._between = False
        if self._begins:  # a later request: its head's clock starts with its first byte
            self.head_since = self.last_active  # (the first one's started at connect)
        self._begins += 1

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"content-length":
            self._declared = int(value) if value.isdigit() else None
        elif name == b"expect" and value.lower() == b"100-continue":
            self._expect = True
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._in_head = False
        if self._head_span > self.max_head and self._head_size() > self.max_head:
            self.malformed(431)
            raise httptools.HttpParserError("head too large")  # stops the parser
        parser = self.parser
        version = parser.get_http_version()
        url = httptools.parse_url(self._url)
        raw_path: bytes = url.path
        path = raw_path.decode("ascii")
        if "%" in path:
            path = unquote(path)
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": version,
            "method": parser.get_method().decode("ascii"),
            "scheme": "http",
            "path": path,
            "raw_path": raw_path,
            "query_string": url.query or b"",
            "root_path": "",
            "headers": self._headers,
            "client": self.peer,
            "server": self.local,
        }
        keep_alive = version != "1.0" and parser.should_keep_alive() and not self.closing
        ex = Exchange(self, scope, keep_alive, self._expect, self._declared)
        self.parsing = ex
        if self.running is None:
            self.start(ex)
        else:  # pipelined: runs when the one before it has answered
            self.pending.append(ex)
            self.pause_reading()

    def on_body(self, body: bytes) -> None:
        ex = self.parsing
        if ex is None or ex.complete:
            return  # answered already: the rest is read and dropped
        ex.received += len(body)
        ex.body.append(body)
        ex.buffered += len(body)
        if ex.buffered > HIGH_WATER:
            self.pause_reading()  # the app reads it (`receive`) before more is read
        ex.wake()

    def _head_size(self) -> int:
        """The head's size from its parsed parts (only asked when its pieces were large)."""
        return len(self._url) + sum(len(n) + len(v) + 4 for n, v in self._headers) + 16

    def on_message_complete(self) -> None:
        self._between = True
        self._in_head = True  # the next request's head, whenever it comes
        ex = self.parsing
        if ex is not None:
            ex.more_body = False
            ex.wake()

    # running requests

    def start(self, ex: Exchange) -> None:
        self.running = ex
        ex.task = task = self.loop.create_task(self.run_app(ex))
        self.server.tasks.add(task)

    async def run_app(self, ex: Exchange) -> None:
        ACTIVITY.requests += 1  # the server polls for a worker only while it has one (polling.py)
        try:
            await self.app(ex.scope, ex.receive, ex.send)
        except BaseException as exc:  # noqa: BLE001 - the connection must be answered or closed
            if not isinstance(exc, asyncio.CancelledError):
                traceback.print_exc(file=sys.stderr)
            self._unfinished(ex)
        else:
            if not ex.complete and not ex.disconnected:
                self._unfinished(ex)
        finally:
            ACTIVITY.requests -= 1
            self.server.tasks.discard(ex.task)  # type: ignore[arg-type]

    def _unfinished(self, ex: Exchange) -> None:
        """The app ended without a complete answer: 500 if nothing was written, else cut it."""
        if ex.disconnected or ex.complete:
            return
        if ex.head_sent:
            self.transport.close()  # the client sees a short body, never a clean one
        else:
            ex.send_500()

    def response_done(self, ex: Exchange) -> None:
        """The answer is written: close, or go on with the next request on this connection."""
        if self.running is ex:
            self.running = None
        if self.transport.is_closing():
            return
        if not ex.keep_alive or self.closing:
            if ex.more_body:
                self.linger()
            else:
                self.transport.close()
            return
        if self.broken:
            self._answer_error(self.broken, _HEAD_TOO_LARGE if self.broken == 431 else _MALFORMED)
            return
        self.idle_since = self.last_active = self.loop.time()
        if self.pending:
            self.start(self.pending.popleft())
        self.resume_reading()

    def linger(self) -> None:
        """Close after an early answer without resetting it: half-close, drop input a while."""
        self.resume_reading()
        if self.transport.can_write_eof():
            self.transport.write_eof()
            self.lingering = self.loop.call_later(LINGER_S, self.transport.close)
        else:
            self.transport.close()

    def malformed(self, status: int = 400) -> None:
        """Not HTTP (400) or too large a head (431): answer and close, after any in flight."""
        self.broken = status
        self.pending.clear()
        ex = self.running
        if ex is not None and ex is self.parsing and ex.more_body and not ex.complete:
            # its own body broke (bad chunk framing): the app would wait for the rest forever
            ex.disconnected = True
            ex.wake()
            self.running = None
            if ex.head_sent:
                self.transport.close()
                return
        if self.running is None:
            self._answer_error(status, _HEAD_TOO_LARGE if status == 431 else _MALFORMED)

    def _answer_error(
        self, status: int, body: bytes, extra: bytes = b"", linger: bool = True
    ) -> None:
        self.broken = self.broken or status
        self.transport.write(
            b"".join(
                (
                    STATUS_LINES[status],
                    self.server.date_line,
                    b"content-type: application/json\r\ncontent-length: %d\r\n" % len(body),
                    extra,
                    b"connection: close\r\n\r\n",
                    body,
                )
            )
        )
        if linger:
            self.linger()
        else:
            self.transport.close()

    # edge limits (`edge.py`), checked by the server's sweep

    def expire(self, now: float) -> None:
        """Close this connection if a client deadline passed: head, body silence, keep-alive."""
        if self.lingering is not None or self.broken or self.transport.is_closing():
            return
        limits = self.server.limits
        ex = self.parsing
        if self.running is not None or self.pending:
            # the app has a request; only a body the client stopped sending is the client's fault
            if (
                ex is not None
                and ex.more_body
                and not self.read_paused
                and now - self.last_active > limits.body_idle_timeout_s
            ):
                self.timed_out(ex)
        elif self._in_head:
            if self._between and self._begins:  # idle between requests
                if now - self.idle_since > limits.keepalive_timeout_s:
                    self.transport.close()
            elif now - self.head_since > limits.header_timeout_s:
                if self._between:  # not a byte of a request yet: nothing to answer
                    self.transport.close()
                else:
                    self.timed_out(None)
        elif (
            ex is not None and ex.more_body and now - self.last_active > limits.body_idle_timeout_s
        ):
            self.transport.close()  # answered early and draining the body: it stopped coming

    def timed_out(self, ex: Exchange | None) -> None:
        """408 and close, or just close once an answer has begun (its client sees it cut)."""
        for other in (self.running, self.parsing, *self.pending):
            if other is not None and not other.complete:
                other.disconnected = True  # the app's later sends are dropped
                other.wake()
        self.pending.clear()
        if ex is not None and ex.head_sent:
            self.transport.close()
        else:
            self._answer_error(408, _TOO_SLOW, linger=False)

    def waiting(self) -> bool:
        """Idle between requests or in a head, nothing for the app: it may make room at the cap."""
        return self._in_head and self.running is None and not self.pending and not self.broken

    def shutdown(self) -> None:
        """Graceful shutdown: close now when idle, else after the answer in flight."""
        self.closing = True
        if self.running is None and not self.pending:
            self.transport.close()


def _address(value: Any) -> tuple[str, int] | None:
    if isinstance(value, tuple) and len(value) >= 2:
        return (str(value[0]), int(value[1]))
    return None
