"""Complete answers written together (`fast_http_exchange.Outbox`), at the protocol level.

A real `FastHttpProtocol` and `FastHttpServer` on an event loop, with a transport
that records what is written, and an ASGI app whose `/slow` route stays in
progress until the test lets it go: while it runs, other answers leave through
the outbox one loop turn later; alone, an answer is written at once. What must
follow an answer on the wire (a pipelined answer, a 400 for bad bytes, the close
of an HTTP/1.0 connection) follows it, and a client that left gets nothing.
"""

from __future__ import annotations

import asyncio
from typing import Any

from kiln.protocols.fast_http import FastHttpProtocol
from kiln.protocols.fast_http_exchange import Outbox
from kiln.protocols.fast_http_server import FastHttpServer
from kiln.serving.polling import ACTIVITY


class RecordingTransport(asyncio.Transport):
    """What the protocol writes, and whether it closed or half-closed."""

    def __init__(self) -> None:
        super().__init__()
        self.out = bytearray()
        self.closed = False
        self.eof = False
        self.writes = 0

    def write(self, data: Any) -> None:
        assert not self.closed and not self.eof, "written after close or EOF"
        self.out += data
        self.writes += 1

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name in ("peername", "sockname") else default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0


class App:
    """`/slow` waits for `release`; any other path echoes its body at once."""

    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if scope["path"] == "/slow":
            await self.release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body or b"-"})


def post(path: str, body: bytes, version: str = "1.1") -> bytes:
    return b"POST %s HTTP/%s\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s" % (
        path.encode(),
        version.encode(),
        len(body),
        body,
    )


def bodies(out: bytes) -> list[tuple[int, bytes]]:
    """(status, body) of each answer in `out` (bodies with Content-Length only)."""
    answers = []
    while out:
        head, rest = out.split(b"\r\n\r\n", 1)
        lines = head.split(b"\r\n")
        length = next(
            int(v) for n, _, v in (x.partition(b": ") for x in lines[1:]) if n == b"content-length"
        )
        answers.append((int(lines[0].split()[1]), rest[:length]))
        out = rest[length:]
    return answers


async def turns(n: int) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def connect(server: FastHttpServer) -> tuple[FastHttpProtocol, RecordingTransport]:
    conn = FastHttpProtocol(server)
    transport = RecordingTransport()
    conn.connection_made(transport)
    return conn, transport


def make_server() -> tuple[FastHttpServer, App]:
    app = App()
    server = FastHttpServer(app)
    server.loop = asyncio.get_running_loop()
    server.outbox = Outbox(server.loop)
    return server, app


async def busy_server() -> tuple[FastHttpServer, App, RecordingTransport]:
    """A server with one request in progress (`/slow`, until `app.release` is set), and
    the transport its answer will be written to."""
    server, app = make_server()
    slow, slow_out = await connect(server)
    slow.data_received(post("/slow", b"s"))
    await turns(2)
    return server, app, slow_out


def test_an_answer_waits_one_turn_while_another_request_runs_then_leaves_whole() -> None:
    async def scenario() -> None:
        server, app, slow_out = await busy_server()
        assert ACTIVITY.requests == 1  # /slow is in progress
        conn, out = await connect(server)
        conn.data_received(post("/echo", b"hello"))
        await turns(1)  # the app ran and answered: the answer waits in the outbox
        assert conn.running is not None and conn.running.complete
        assert out.out == b"" and server.outbox.waiting
        await turns(1)
        assert bodies(bytes(out.out)) == [(200, b"hello")] and out.writes == 1
        assert conn.running is None and not out.closed  # kept alive for the next request
        app.release.set()
        await turns(3)
        assert bodies(bytes(slow_out.out)) == [(200, b"s")]
        assert ACTIVITY.requests == 0

    asyncio.run(scenario())


def test_alone_an_answer_is_written_in_its_own_turn() -> None:
    async def scenario() -> None:
        server, _ = make_server()
        conn, out = await connect(server)
        conn.data_received(post("/echo", b"alone"))
        await turns(1)
        assert bodies(bytes(out.out)) == [(200, b"alone")]
        assert not server.outbox.waiting and conn.running is None

    asyncio.run(scenario())


def test_what_follows_an_answer_on_the_wire_still_follows_it() -> None:
    async def scenario() -> None:
        server, app, _ = await busy_server()
        conn, out = await connect(server)
        # Two pipelined requests, then, while the second's answer waits in the outbox,
        # bytes that are not HTTP: 200, 200, then 400 and EOF, in that order.
        conn.data_received(post("/echo", b"one") + post("/echo", b"two"))
        for _ in range(10):
            await turns(1)
            running = conn.running
            if running is not None and running.complete and not conn.pending:
                break
        assert server.outbox.waiting and server.outbox.waiting[-1][0] is conn.running
        conn.data_received(b"BAD\x00\r\n\r\n")
        await turns(3)
        answers = bodies(bytes(out.out))
        assert [status for status, _ in answers] == [200, 200, 400]
        assert answers[0][1] == b"one" and answers[1][1] == b"two"
        assert out.eof  # half-closed after the 400 (linger), never before the answers
        # HTTP/1.0: the answer, then the close.
        old, old_out = await connect(server)
        old.data_received(post("/echo", b"old", version="1.0"))
        await turns(1)
        assert old_out.out == b"" and not old_out.closed
        await turns(1)
        status, body = bodies(bytes(old_out.out))[0]
        assert (status, body) == (200, b"old") and b"connection: close" in bytes(old_out.out)
        assert old_out.closed
        app.release.set()
        await turns(3)

    asyncio.run(scenario())


def test_a_client_that_left_before_the_write_gets_nothing_and_breaks_nothing() -> None:
    async def scenario() -> None:
        server, app, _ = await busy_server()
        conn, out = await connect(server)
        conn.data_received(post("/echo", b"gone"))
        await turns(1)
        assert server.outbox.waiting
        out.closed = True  # the client left: the transport closes, then connection_lost
        conn.connection_lost(None)
        other, other_out = await connect(server)  # a later answer in the same flush
        await turns(1)
        assert out.out == b"" and not server.outbox.waiting
        assert conn not in server.connections
        other.data_received(post("/echo", b"next"))
        await turns(2)
        assert bodies(bytes(other_out.out)) == [(200, b"next")]
        app.release.set()
        await turns(3)

    asyncio.run(scenario())
