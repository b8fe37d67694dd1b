"""The response head Kiln's HTTP layer writes (`fast_http_exchange.Exchange._head`).

Exact bytes for the usual answer; the framing headers an app sets are honoured;
a CR or LF inside any header name or value (response splitting) is refused.
"""

from __future__ import annotations

from typing import Any

import pytest

from kiln.protocols.fast_http_exchange import Exchange

DATE = b"date: Sun, 06 Dec 2026 01:30:00 GMT\r\n"


class Server:
    date_line = DATE


class Conn:
    server = Server()
    closing = False
    write_paused = False


def exchange(headers: Any, status: int = 200) -> Exchange:
    ex = Exchange(Conn(), {"method": "POST"}, True, False, 10)  # type: ignore[arg-type]
    ex.more_body = False  # the request arrived whole
    ex.status, ex.headers = status, headers
    return ex


def test_the_usual_answer_head_byte_for_byte() -> None:
    ex = exchange([(b"Content-Type", b"application/json"), (b"x-request-id", b"abc")])
    assert ex._head(False, 12) == (
        b"HTTP/1.1 200 OK\r\n" + DATE + b"content-type: application/json\r\n"
        b"x-request-id: abc\r\ncontent-length: 12\r\n\r\n"
    )
    assert ex.remaining == 12 and ex.keep_alive


def test_framing_headers_from_the_app_are_honoured() -> None:
    ex = exchange([(b"content-length", b"5"), (b"connection", b"Close")])
    head = ex._head(False, 5)
    assert head.count(b"content-length") == 1 and b"connection: Close\r\n" in head
    assert not ex.keep_alive and ex.remaining == 5
    streamed = exchange([(b"transfer-encoding", b"chunked")])
    assert streamed._head(True, 0).endswith(b"transfer-encoding: chunked\r\n\r\n")
    assert streamed.chunked
    empty = exchange([], status=204)
    assert empty._head(False, 0) == b"HTTP/1.1 204 No Content\r\n" + DATE + b"\r\n"


@pytest.mark.parametrize(
    "headers",
    [
        [(b"x-a", b"v\r\nset-cookie: stolen=1")],
        [(b"x-a", b"v\n")],
        [(b"x-a", b"v\r")],
        [(b"x-a\r\nx-b", b"v")],
        [(b"ok", b"fine"), (b"x\n", b"v")],
    ],
)
def test_a_cr_or_lf_inside_a_header_is_refused(headers: list[tuple[bytes, bytes]]) -> None:
    with pytest.raises(RuntimeError, match="CR or LF"):
        exchange(headers)._head(False, 0)
