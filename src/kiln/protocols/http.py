"""Small raw-ASGI helpers for the inference hot path.

The hot routes are plain ASGI, not a framework: reading a body with a size
limit, parsing a query string and sending bytes is all they need, and every
microsecond here is added to every prediction.
"""

from __future__ import annotations

import os
import random
import re
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qsl

import orjson

from kiln.errors import PayloadTooLarge
from kiln.serving import tracing

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

_SAFE_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
# Request ids correlate logs, they guard nothing: a generator seeded once from the OS
# (no getrandom() system call per request, as os.urandom made), 128 bits as before.
_new_id = random.Random(os.urandom(32)).getrandbits


def new_request_id() -> str:
    """A fresh request id (32 hex digits): for requests Kiln itself sends to a worker too."""
    return f"{_new_id(128):032x}"


class Request:
    """The parts of an HTTP request the adapters use, decoded once."""

    __slots__ = ("scope", "receive", "method", "path", "headers", "query", "request_id", "trace")

    def __init__(self, scope: Scope, receive: Receive) -> None:
        self.scope = scope
        self.receive = receive
        self.method: str = scope["method"]
        self.path: str = scope["path"]
        self.headers: dict[str, str] = {
            k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]
        }
        raw_query = scope.get("query_string", b"")
        self.query: dict[str, str] = (
            dict(parse_qsl(raw_query.decode("latin-1"))) if raw_query else {}
        )
        given = self.headers.get("x-request-id", "")
        self.request_id = given if given and _SAFE_ID.match(given) else f"{_new_id(128):032x}"
        # The request's trace (its caller's `traceparent` read here, once, for every HTTP
        # protocol); off, this bool is the one check tracing costs a request.
        self.trace = (
            tracing.start_request(self.headers.get, self.request_id, self.method, self.path)
            if tracing.ENABLED
            else None
        )

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "").split(";", 1)[0].strip().lower()

    def flag(self, name: str) -> bool:
        return self.query.get(name, "").lower() in ("1", "true", "yes")

    async def body(self, limit: int) -> bytes:
        """The whole body, refusing (413) before reading past `limit` bytes."""
        declared = self.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise PayloadTooLarge(_too_large(int(declared), limit))
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(_too_large(size, limit, at_least=True))
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _too_large(size: int, limit: int, at_least: bool = False) -> str:
    got = f"at least {size}" if at_least else str(size)
    return (
        f"the request body is {got} bytes, over this API's limit of {limit} bytes; "
        f"send less data per request or raise serving.max_request_bytes in kiln.yaml"
    )


async def send_bytes(
    send: Send,
    status: int,
    body: bytes,
    content_type: str,
    request_id: str,
    extra: dict[str, str] | None = None,
) -> None:
    headers = [
        (b"content-type", content_type.encode("latin-1")),
        (b"content-length", str(len(body)).encode()),
        (b"x-request-id", request_id.encode("latin-1")),
    ]
    if extra:
        headers.extend((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in extra.items())
    respond = getattr(send, "respond", None)  # protocols/app.py: one call, no ASGI messages
    if respond is not None and respond(status, headers, body):
        return
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def send_json(
    send: Send, status: int, value: Any, request_id: str, extra: dict[str, str] | None = None
) -> None:
    await send_bytes(send, status, orjson.dumps(value), "application/json", request_id, extra)
