"""`ConsoleFront`: the management port's outermost app; `/console...` is the console's.

Why a front rather than routes inside the management app: the console signs in
with a cookie, not a key header, so its paths must not meet `ManagementGate`;
everything else passes through unchanged. The console's own reads and changes go
back *through* the gated app (`Rest.call`), carrying the session's key, so the
gate and the REST handlers decide what a session may see and do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from kiln.protocols.in_process import call_asgi

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
        headers: list[tuple[bytes, bytes]] = []
        if body is not None:
            headers.append((b"content-type", b"application/json"))
        if key is not None:
            headers.append((b"x-api-key", key.encode()))
        status, raw = await call_asgi(
            self.app, method, path, query=query, headers=headers, body=payload
        )
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
