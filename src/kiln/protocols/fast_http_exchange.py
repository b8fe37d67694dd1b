"""One request/response exchange of Kiln's HTTP layer: the ASGI `receive` and `send`.

Split from the connection (`fast_http.py`) along the ASGI seam: this side turns
parsed request bytes into `http.request` messages and ASGI response messages into
bytes on the wire. A complete answer (`more_body` false) is written with its
head in ONE `transport.write`; a streamed one is framed chunk by chunk. While
other requests are in progress, complete answers leave together through the
server's `Outbox` (why: its docstring).
"""

from __future__ import annotations

import asyncio
import http
from typing import Any, Protocol

from kiln.serving.polling import ACTIVITY


class _Server(Protocol):
    date_line: bytes
    outbox: Outbox


class Connection(Protocol):
    """What an exchange needs of its connection (fast_http.FastHttpProtocol), named here
    so this module need not import the connection module that imports it."""

    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop
    write_paused: bool
    closing: bool

    @property
    def server(self) -> _Server: ...

    def resume_reading(self) -> None: ...

    async def drain(self) -> None: ...

    def response_done(self, ex: Exchange) -> None: ...


_FRAMING = frozenset((b"content-length", b"transfer-encoding", b"connection"))
HIGH_WATER = 65536  # request-body bytes buffered before reading pauses (uvicorn's value)
DISCARD_LIMIT = 1 << 20  # unread body drained to keep a connection after an early answer
LINGER_S = 2.0  # after answering early and closing: keep reading so the answer is not RST
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_CRLF = b"\r\n"


def _status_line(code: int) -> bytes:
    try:
        phrase = http.HTTPStatus(code).phrase.encode()
    except ValueError:
        phrase = b""
    return b"HTTP/1.1 %d %s\r\n" % (code, phrase)


STATUS_LINES = {code: _status_line(code) for code in range(100, 600)}


class Exchange:
    """One request and its response: the `receive` and `send` the ASGI app is given."""

    __slots__ = (
        "conn",
        "scope",
        "keep_alive",
        "head_only",
        "declared",
        "received",
        "body",
        "buffered",
        "more_body",
        "delivered",
        "waiter",
        "continue_pending",
        "status",
        "headers",
        "head_sent",
        "chunked",
        "remaining",
        "complete",
        "disconnected",
        "task",
    )

    def __init__(
        self,
        conn: Connection,
        scope: dict[str, Any],
        keep_alive: bool,
        expect_continue: bool,
        declared: int | None,
    ) -> None:
        self.conn = conn
        self.scope = scope
        self.keep_alive = keep_alive
        self.head_only = scope["method"] == "HEAD"
        self.declared = declared  # the request's Content-Length (None: chunked or absent)
        self.received = 0
        self.body: list[bytes] = []
        self.buffered = 0
        self.more_body = True  # False once the parser saw the whole request
        self.delivered = False  # the last `http.request` message was handed out
        self.waiter: asyncio.Future[None] | None = None
        self.continue_pending = expect_continue
        self.status: int | None = None  # set by `http.response.start`, written with the body
        self.headers: Any = ()
        self.head_sent = False
        self.chunked = False
        self.remaining: int | None = None  # declared response bytes still to send
        self.complete = False
        self.disconnected = False
        self.task: asyncio.Task[None] | None = None

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def receive(self) -> dict[str, Any]:
        """The next `http.request` piece; `http.disconnect` once the client left or we answered."""
        if self.continue_pending:
            self.continue_pending = False  # the app wants the body: tell the client to send it
            if not self.conn.transport.is_closing():
                self.conn.transport.write(CONTINUE)
        while True:
            if self.disconnected or self.complete:
                return {"type": "http.disconnect"}
            if self.body or (not self.more_body and not self.delivered):
                chunks = self.body
                body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                self.body = []
                self.buffered = 0
                more = self.more_body
                self.delivered = not more
                if more:
                    self.conn.resume_reading()
                return {"type": "http.request", "body": body, "more_body": more}
            self.conn.resume_reading()
            self.waiter = self.conn.loop.create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None

    async def send(self, message: dict[str, Any]) -> None:
        conn = self.conn
        if conn.write_paused and not self.disconnected:
            await conn.drain()
        if self.disconnected:
            return
        kind = message["type"]
        if self.status is None:
            if kind != "http.response.start":
                raise RuntimeError(f"expected 'http.response.start', got {kind!r}")
            self.status = message["status"]
            self.headers = message.get("headers", ())
            return  # written with the first body piece
        if self.complete or kind != "http.response.body":
            raise RuntimeError(f"unexpected ASGI message {kind!r} for this response")
        self.write_body(message.get("body", b""), message.get("more_body", False))

    def respond(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> bool:
        """A complete answer in one call, without the two ASGI messages and their awaits
        (`http.send_bytes` uses it). False when it must go the ASGI way: the transport is
        paused for writing (that needs an await) or an answer was started."""
        if self.status is not None or (self.conn.write_paused and not self.disconnected):
            return False
        if not self.disconnected:
            self.status = status
            self.headers = headers
            self.write_body(body, False)
        return True

    def write_body(self, body: bytes, more: bool) -> None:
        """Write a body piece; with the head when it is the first (one write when complete)."""
        transport = self.conn.transport
        if self.head_only:
            body = b""
        if not self.head_sent:
            head = self._head(more, len(body))
            self.head_sent = True
            if self.chunked:
                transport.write(head + _frame(body, more))
            elif len(body) > HIGH_WATER:  # a join would copy a large body: two writes
                transport.write(head)
                transport.write(body)
            elif not more and ACTIVITY.requests > 1:
                # Other requests are in progress: this answer leaves with theirs (`Outbox`);
                # the connection goes on (`response_done`) once it is written.
                self._completed(len(body))
                self.conn.server.outbox.add(self, head + body)
                return
            else:
                transport.write(head + body)
        elif self.chunked:
            framed = _frame(body, more)
            if framed:
                transport.write(framed)
        elif body:
            transport.write(body)
        if not more:
            self._completed(len(body))
            self.conn.response_done(self)
        elif self.remaining is not None:
            self.remaining -= len(body)

    def _completed(self, size: int) -> None:
        """The last body piece (`size` bytes) is out or in the outbox: the answer is done."""
        if self.remaining is not None:
            self.remaining -= size
        self.complete = True
        if self.remaining:  # not what Content-Length said: the framing is lost
            self.keep_alive = False
        self.wake()

    def _head(self, more: bool, size: int) -> bytes:
        """Status line and headers, with the framing and connection headers HTTP/1.1 needs."""
        status = self.status or 500
        parts = [STATUS_LINES.get(status) or _status_line(status), self.conn.server.date_line]
        length = None
        close_given = False
        lines = 2  # the status line and the date
        for name, value in self.headers:
            lines += 1
            name = name.lower()
            if name in _FRAMING:
                if name == b"content-length":
                    length = int(value)
                elif name == b"transfer-encoding":
                    self.chunked = value.lower() == b"chunked"
                elif b"close" in value.lower():  # connection
                    self.keep_alive = False
                    close_given = True
            parts += (name, b": ", value, _CRLF)
        # No CR or LF inside a name or value (header injection): the status line, the date
        # and each header end in exactly one CRLF, so any other CR or LF changes the counts.
        # (Two scans of the joined bytes cost a third of four `in` tests per header.)
        if lines > 2:
            joined = b"".join(parts)
            if joined.count(b"\r") != lines or joined.count(b"\n") != lines:
                raise RuntimeError("invalid HTTP header: CR or LF in a name or value")
            parts = [joined]
        bodyless = self.head_only or status < 200 or status in (204, 304)
        if length is None and not self.chunked and not bodyless:
            if more:
                self.chunked = True
                parts.append(b"transfer-encoding: chunked\r\n")
            else:
                length = size
                parts += (b"content-length: ", str(size).encode(), _CRLF)
        if length is not None and not self.head_only:
            self.remaining = length
        if self.keep_alive and (self.conn.closing or (self.more_body and not self._drainable())):
            self.keep_alive = False
        self.continue_pending = False
        if not self.keep_alive and not close_given:
            parts.append(b"connection: close\r\n")
        parts.append(_CRLF)
        return b"".join(parts)

    def _drainable(self) -> bool:
        """Answered before the whole body came: can the rest be read and dropped, keeping the link?

        Not when the client waits for `100 Continue` (it may never send the body),
        nor when the rest is unknown (chunked) or large: then the connection closes.
        """
        if self.continue_pending or self.declared is None:
            return False
        return self.declared - self.received <= DISCARD_LIMIT

    def send_500(self) -> None:
        self.status = 500
        self.headers = [(b"content-type", b"text/plain; charset=utf-8"), (b"connection", b"close")]
        self.write_body(b"Internal Server Error", False)


class Outbox:
    """Complete answers written together at the next loop turn, while others are in progress.

    Why: a write that wakes a client sleeping on another CPU costs the writer about
    twice one that reaches a client still running (12.5 us against 6 us per `send` on
    the 2-vCPU microVM of docs/performance.md, whose idle vCPUs halt at once), and each
    wake-up takes the CPU from whatever ran there, the model's worker included. A
    batch's answers wake their requests' tasks in one loop turn; writing each from its
    task put its bookkeeping (metrics, log line) between writes, so every client had
    gone back to sleep before its neighbour's answer came. Written back to back, they
    find the client still reading the ones before (mlp at c=64: +20-26% req/s).
    `Exchange.write_body` sends an answer here only when another request is in
    progress on the port (`ACTIVITY`), so a lone request is never delayed.

    The connection goes on with its next request (`response_done`) only once its
    answer is written: anything that must follow the answer on the wire (a pipelined
    request's answer, a 400 for bad bytes after it, the close at shutdown) waits for
    it, as it does for an answer written at once.
    """

    __slots__ = ("loop", "waiting", "scheduled")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.waiting: list[tuple[Exchange, bytes]] = []
        self.scheduled = False

    def add(self, ex: Exchange, data: bytes) -> None:
        self.waiting.append((ex, data))
        if not self.scheduled:
            self.scheduled = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write every waiting answer, in the order they were finished."""
        self.scheduled = False
        waiting, self.waiting = self.waiting, []
        for ex, data in waiting:
            conn = ex.conn
            if not conn.transport.is_closing():  # the client left meanwhile: nobody reads it
                conn.transport.write(data)
            conn.response_done(ex)


def _frame(body: bytes, more: bool) -> bytes:
    framed = b"%x\r\n%s\r\n" % (len(body), body) if body else b""
    return framed if more else framed + b"0\r\n\r\n"
