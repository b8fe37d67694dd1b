"""Kiln's own HTTP/1.1 layer for the inference port: httptools driving the ASGI app directly.

Why not uvicorn here: on a 2-vCPU box the gateway process is the bottleneck,
and about a third of its time went to uvicorn's generic HTTP work (header
validation regexes, a per-request cycle object and `asyncio.Event`, two
socket writes per response). This layer keeps the same ASGI contract, so
`InferenceApp` and every adapter run unchanged, but:

- `http.response.start` is buffered and written together with the body, so a
  complete answer is ONE `transport.write` (one system call);
- a body that already arrived is handed to `receive()` without waiting on
  anything, and nothing is allocated for waiting unless the app must wait;
- streamed answers (`more_body=True`: chunked, SSE) still leave chunk by chunk.

The listening side (connections, keep-alive expiry, the `date` header, graceful
shutdown) is in `fast_http_server.py`, one request's `receive`/`send` in
`fast_http_exchange.py`; the management and metrics ports stay on
uvicorn, where generality matters more than microseconds.
"""

from __future__ import annotations

import asyncio
import sys
import traceback
from collections import deque
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import httptools

from kiln.protocols.fast_http_exchange import HIGH_WATER, LINGER_S, STATUS_LINES, Exchange

MAX_HEAD = 64 * 1024  # request line or headers beyond this: 400 and close

if TYPE_CHECKING:
    from kiln.protocols.fast_http_server import FastHttpServer


class FastHttpProtocol(asyncio.Protocol):
    """One client connection: parses requests, runs them one at a time, writes answers."""

    def __init__(self, server: FastHttpServer) -> None:
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
        self.broken = False  # a malformed request: answer 400 once the one in flight is done
        self.lingering: asyncio.TimerHandle | None = None
        self.last_active = 0.0
        # per-request parser state
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._expect = False
        self._declared: int | None = None
        self._in_head = False  # a request line or headers are being received
        self._head_bytes = 0  # bytes received while in a head (httptools has no limit)

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.peer = _address(transport.get_extra_info("peername"))
        self.local = _address(transport.get_extra_info("sockname"))
        self.last_active = self.loop.time()
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        for ex in (self.running, self.parsing, *self.pending):
            if ex is not None and not ex.complete:
                ex.disconnected = True
                ex.wake()
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
        if self._in_head:  # a head in pieces: bounded, so a client cannot grow it forever
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD:
                self.malformed()
                return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass  # no protocol upgrades here: the request is answered as plain HTTP
        except httptools.HttpParserError:
            self.malformed()

    def eof_received(self) -> bool | None:
        return None  # close our side too

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
        self._in_head = True

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

    def on_message_complete(self) -> None:
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
            self._answer_400()
            return
        self.last_active = self.loop.time()
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

    def malformed(self) -> None:
        """Not HTTP: 400 and close, after the answer in flight if there is one."""
        self.broken = True
        self.pending.clear()
        if self.running is None:
            self._answer_400()

    def _answer_400(self) -> None:
        body = b'{"error":{"type":"InvalidInput","message":"malformed HTTP request"}}'
        self.transport.write(
            b"".join(
                (
                    STATUS_LINES[400],
                    self.server.date_line,
                    b"content-type: application/json\r\ncontent-length: %d\r\n" % len(body),
                    b"connection: close\r\n\r\n",
                    body,
                )
            )
        )
        self.linger()

    def shutdown(self) -> None:
        """Graceful shutdown: close now when idle, else after the answer in flight."""
        self.closing = True
        if self.running is None and not self.pending:
            self.transport.close()


def _address(value: Any) -> tuple[str, int] | None:
    if isinstance(value, tuple) and len(value) >= 2:
        return (str(value[0]), int(value[1]))
    return None
