"""`ConsoleFront`: the management port's outermost app; `/console...` is the console's.

Why a front rather than routes inside the management app: the console signs in
with a cookie, not a key header, so its paths must not meet `ManagementGate`;
everything else passes through unchanged. The console's own reads and changes go
back *through* the gated app (`Rest.call`), carrying the session's key, so the
gate and the REST handlers decide what a session may see and do.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import orjson

PREFIX = "/console"


@dataclass
class Answer:
    """A REST sub-request's answer."""

    status: int
    body: Any  # parsed JSON, or the raw text when it was not JSON

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def message(self) -> str:
        if isinstance(self.body, dict) and "message" in self.body:
            return str(self.body["message"])
        return str(self.body)[:500]


class Rest:
    """In-process calls to the (gated) management app, as `curl` with the key would make."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def call(
        self,
        method: str,
        path: str,
        key: str | None,
        *,
        query: dict[str, str] | None = None,
        body: Any = None,
    ) -> Answer:
        payload = b"" if body is None else orjson.dumps(body)
        headers = [(b"host", b"localhost"), (b"content-length", str(len(payload)).encode())]
        if body is not None:
            headers.append((b"content-type", b"application/json"))
        if key is not None:
            headers.append((b"x-api-key", key.encode()))
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
            "headers": headers,
            "client": ("127.0.0.1", 0),
            "server": ("127.0.0.1", 0),
            "state": {},
        }
        sent = False
        done = asyncio.Event()

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if sent:  # a streaming answer listens for the client leaving: only once it is done
                await done.wait()
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": payload, "more_body": False}

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

        await self.app(scope, receive, send)
        raw = b"".join(chunks)
        try:
            parsed: Any = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            parsed = raw.decode("utf-8", "replace")
        return Answer(status, parsed)


class ConsoleFront:
    """ASGI: `/console` and below to the console app, every other path to `inner`."""

    def __init__(self, inner: Any, console_app: Any) -> None:
        self.inner = inner
        self.console_app = console_app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if path == PREFIX or path.startswith(PREFIX + "/"):
            await self.console_app(scope, receive, send)
        else:
            await self.inner(scope, receive, send)
