"""Kiln's own HTTP layer (`KILN_HTTP=kiln`) at the byte level, with raw sockets.

httpx hides framing, so the protocol's edge cases are driven by hand against a
real `kiln serve`: pipelining, 100-continue, bodies in pieces, chunked request
bodies, clients that leave, malformed requests, HTTP/1.0, early 413 answers
and graceful shutdown.
"""

from __future__ import annotations

import signal
import socket
import threading
import time
from pathlib import Path

import orjson
import pytest
from support import KilnServer, write

HANDLER = """
import time

import kiln


@kiln.handler
def echo(payload, context):
    if isinstance(payload, dict) and "sleep" in payload:
        time.sleep(payload["sleep"])
    return {"echo": payload, "request_id": context.request_id}
"""

KILN_YAML = """
- kind: api
  name: echo
  python:
    handler: echo.py
  serving:
    max_request_bytes: 512
"""


class Conn:
    """One raw HTTP/1.1 client connection that reads answers off its own buffer."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        self.buffer += data
        return bool(data)

    def read_head(self) -> tuple[int, dict[str, str]]:
        while b"\r\n\r\n" not in self.buffer:
            if not self._fill():
                raise ConnectionError(f"closed before a full head: {self.buffer!r}")
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
        return status, headers

    def read_response(self) -> tuple[int, dict[str, str], bytes]:
        status, headers = self.read_head()
        if headers.get("transfer-encoding") == "chunked":
            body = b""
            while True:
                while b"\r\n" not in self.buffer:
                    self._fill()
                size_line, self.buffer = self.buffer.split(b"\r\n", 1)
                size = int(size_line, 16)
                while len(self.buffer) < size + 2:
                    self._fill()
                body += self.buffer[:size]
                self.buffer = self.buffer[size + 2 :]
                if size == 0:
                    return status, headers, body
        length = int(headers.get("content-length", "0"))
        while len(self.buffer) < length:
            if not self._fill():
                break
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return status, headers, body

    def closed_by_server(self, timeout: float = 5) -> bool:
        self.sock.settimeout(timeout)
        try:
            while self._fill():
                pass
        except ConnectionResetError:
            pass
        return True

    def close(self) -> None:
        self.sock.close()


def post(path: str, body: bytes, *extra: str, version: str = "1.1") -> bytes:
    lines = [f"POST {path} HTTP/{version}", "Host: test", f"Content-Length: {len(body)}", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fast-http")
    write(root / "echo.py", HANDLER)
    write(root / "kiln.yaml", KILN_YAML)
    return root


@pytest.fixture(scope="module")
def server(project: Path, tmp_path_factory: pytest.TempPathFactory):
    srv = KilnServer(project, tmp_path_factory.mktemp("home"), env={"KILN_HTTP": "kiln"})
    yield srv
    srv.stop()


@pytest.fixture
def conn(server: KilnServer):
    c = Conn(server.url)
    yield c
    c.close()


def test_keep_alive_answers_in_one_piece_with_the_usual_headers(conn: Conn) -> None:
    for n in range(3):
        conn.send(post("/echo", b"[%d]" % n, f"X-Request-ID: rid-{n}"))
        status, headers, body = conn.read_response()
        assert status == 200
        assert orjson.loads(body) == {"echo": [n], "request_id": f"rid-{n}"}
        assert headers["x-request-id"] == f"rid-{n}"
        assert headers["content-length"] == str(len(body))
        assert headers["content-type"] == "application/json"
        assert headers["date"].endswith(" GMT")
        assert "connection" not in headers


def test_pipelined_requests_are_answered_in_order(conn: Conn) -> None:
    conn.send(b"".join(post("/echo", b"%d" % n, f"X-Request-ID: p-{n}") for n in range(5)))
    for n in range(5):
        status, headers, body = conn.read_response()
        assert status == 200 and headers["x-request-id"] == f"p-{n}"
        assert orjson.loads(body)["echo"] == n
    conn.send(b"HEAD /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
    status, headers = conn.read_head()  # a HEAD answer has the length but no body
    assert status == 200 and int(headers["content-length"]) > 0
    conn.send(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
    status, _, body = conn.read_response()
    assert status == 200 and orjson.loads(body) == {"status": "ok"}


def test_a_body_in_pieces_and_a_chunked_body(conn: Conn) -> None:
    body = orjson.dumps(list(range(40)))
    whole = post("/echo", body)
    for cut in (len(whole) - len(body) - 3, len(whole) - 5):  # inside the head, inside the body
        conn.send(whole[:cut])
        time.sleep(0.05)
        conn.send(whole[cut:])
        assert orjson.loads(conn.read_response()[2])["echo"] == list(range(40))
    conn.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
    for piece in (body[:7], body[7:30], body[30:]):
        conn.send(b"%x\r\n%s\r\n" % (len(piece), piece))
        time.sleep(0.05)
    conn.send(b"0\r\n\r\n")
    status, _, answer = conn.read_response()
    assert status == 200 and orjson.loads(answer)["echo"] == list(range(40))


def test_expect_100_continue(conn: Conn) -> None:
    conn.send(post("/echo", b"", "Expect: 100-continue").replace(b"Length: 0", b"Length: 4"))
    status, _ = conn.read_head()
    assert status == 100
    conn.send(b"[42]")
    status, _, body = conn.read_response()
    assert status == 200 and orjson.loads(body)["echo"] == [42]


def test_too_large_is_413_at_once_and_no_100_continue(server: KilnServer) -> None:
    for extra in ((), ("Expect: 100-continue",)):
        c = Conn(server.url)
        head = post("/echo", b"", *extra).replace(b"Length: 0", b"Length: 10000000")
        c.send(head)  # the body never comes: the answer must not wait for it
        status, headers, body = c.read_response()
        assert status == 413, body
        assert orjson.loads(body)["error"]["type"] == "PayloadTooLarge"
        assert headers["connection"] == "close"
        assert c.closed_by_server()
        c.close()
    small = Conn(server.url)  # a small rest is read and dropped: the connection stays
    small.send(post("/echo", b"[" + b"1," * 300 + b"1]"))
    assert small.read_response()[0] == 413
    small.send(post("/echo", b"[1]"))
    assert small.read_response()[0] == 200
    small.close()


def test_http_1_0_gets_its_answer_then_the_connection_closes(conn: Conn) -> None:
    conn.send(post("/echo", b'"old"', version="1.0"))
    status, headers, body = conn.read_response()
    assert status == 200 and orjson.loads(body)["echo"] == "old"
    assert headers["connection"] == "close"
    assert conn.closed_by_server()


def test_malformed_request_is_400_and_closed(server: KilnServer, conn: Conn) -> None:
    conn.send(b"NOT HTTP AT ALL\r\n\r\n")
    status, headers, _ = conn.read_response()
    assert status == 400 and headers["connection"] == "close"
    assert conn.closed_by_server()
    huge = Conn(server.url)  # headers without end are refused, not buffered
    huge.send(b"GET /healthz HTTP/1.1\r\nX-Pad: ")
    for _ in range(20):
        time.sleep(0.01)
        try:
            huge.send(b"a" * 8192)
        except OSError:
            break  # refused and closed mid-way
    assert huge.read_response()[0] == 431  # request header fields too large (edge.py)
    huge.close()
    after = Conn(server.url)  # a good request after a bad one in the same burst: answered
    after.send(post("/echo", b"1") + b"BAD\x00\r\n\r\n")
    assert after.read_response()[0] == 200
    assert after.read_response()[0] == 400
    after.close()


def test_clients_that_leave_mid_request_do_not_hurt_the_server(server: KilnServer) -> None:
    half = Conn(server.url)  # leaves mid-body
    half.send(post("/echo", b"[1, 2, 3]")[:-4])
    half.close()
    waiting = Conn(server.url)  # leaves while the model works
    waiting.send(post("/echo", b'{"sleep": 0.5}'))
    time.sleep(0.1)
    waiting.close()
    fresh = Conn(server.url)
    fresh.send(post("/echo", b"[7]"))
    assert fresh.read_response()[0] == 200
    fresh.close()
    records = server.api_log("echo", until=lambda rs: len(rs) >= 1 and _left(rs))
    assert _left(records), "the request whose client left is logged, as cancelled (499)"


def _left(records: list[dict]) -> bool:
    """A request cancelled when its client left (nginx's 499), before its 0.5 s of work."""
    return any(
        r.get("event") == "request" and r.get("status") == 499 and r.get("latency_ms", 0) < 400
        for r in records
    )


def test_graceful_shutdown_finishes_in_flight_and_closes_idle(
    project: Path, tmp_path: Path
) -> None:
    srv = KilnServer(project, tmp_path / "home", env={"KILN_HTTP": "kiln"})
    try:
        idle = Conn(srv.url)
        idle.send(post("/echo", b"1"))
        assert idle.read_response()[0] == 200
        busy = Conn(srv.url)
        busy.send(post("/echo", b'{"sleep": 1.0}'))
        result: dict[str, object] = {}
        reader = threading.Thread(target=lambda: result.update(answer=busy.read_response()))
        reader.start()
        time.sleep(0.3)
        srv.proc.send_signal(signal.SIGTERM)
        assert idle.closed_by_server()
        reader.join(10)
        status, headers, body = result["answer"]  # type: ignore[misc]
        assert status == 200 and orjson.loads(body)["echo"] == {"sleep": 1.0}
        assert headers["connection"] == "close"
        assert srv.proc.wait(30) == 0
    finally:
        srv.stop()
