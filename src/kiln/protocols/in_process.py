"""One HTTP request to an ASGI app inside this process: (status, body).

The console (console/front.py) and the gRPC management service
(protocols/grpc/torchserve_service.py) both act through the management REST app
with the caller's key, as `curl` would, so its gate, scopes and errors apply
unchanged; this is the one place such a request is built and its answer collected.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import urlencode


async def call_asgi(
    app: Any,
    method: str,
    path: str,
    *,
    query: dict[str, str] | None = None,
    headers: list[tuple[bytes, bytes]] | None = None,
    body: bytes = b"",
) -> tuple[int, bytes]:
    """Send one request to `app` and collect its whole answer.

    `headers` are added to Host and Content-Length. The request's body is given
    once; after that `receive` waits until the answer is complete, then reports a
    disconnect (a streaming answer listens for the client leaving)."""
    sent_headers = [(b"host", b"localhost"), (b"content-length", str(len(body)).encode())]
    sent_headers.extend(headers or [])
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method.upper(),
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": urlencode(query or {}).encode(),
        "root_path": "",
        "headers": sent_headers,
        "client": ("127.0.0.1", 0),
        "server": ("127.0.0.1", 0),
        "state": {},
    }
    done = asyncio.Event()
    given = False

    async def receive() -> dict[str, Any]:
        nonlocal given
        if given:
            await done.wait()
            return {"type": "http.disconnect"}
        given = True
        return {"type": "http.request", "body": body, "more_body": False}

    status = 500
    chunks: list[bytes] = []

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                done.set()

    await app(scope, receive, send)
    return status, b"".join(chunks)
