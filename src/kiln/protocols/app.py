"""The inference port: one raw ASGI app routing to each protocol adapter."""

from __future__ import annotations

import sys
import time
import traceback
from typing import Any

from kiln.errors import KilnError, MethodNotAllowed
from kiln.protocols.errors import error_headers, native_error
from kiln.protocols.http import Receive, Request, Scope, Send, send_json
from kiln.protocols.native import NativeApi, now_ms, unknown_path
from kiln.serving.router import Registry

_SYSTEM = "kiln"


class InferenceApp:
    """Serves `/`, `/apis`, `/healthz` and every API's native endpoint."""

    def __init__(self, registry: Registry, log: Any) -> None:
        self.registry = registry
        self.log = log
        self.native = NativeApi(registry, log)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        started = time.perf_counter()
        request = Request(scope, receive)
        api_name = _SYSTEM
        status = 500
        try:
            matched = self.native.match(request.path)
            if matched is not None:
                api_name = matched[0].name
                status = await self.native.handle(request, send, *matched)
            else:
                status = await self._system_route(request, send)
        except KilnError as err:
            status = err.status
            await send_json(
                send,
                status,
                native_error(err, request.request_id),
                request.request_id,
                error_headers(err),
            )
        except Exception:  # a bug in Kiln itself: log it, never show it
            traceback.print_exc(file=sys.stderr)
            status = 500
            err = KilnError("internal server error; the details are in the server log")
            await send_json(send, 500, native_error(err, request.request_id), request.request_id)
        if api_name != _SYSTEM or status >= 400:
            self.log.write(
                api_name,
                {
                    "event": "request",
                    "method": request.method,
                    "path": request.path,
                    "status": status,
                    "latency_ms": now_ms(started),
                    "request_id": request.request_id,
                },
            )

    async def _system_route(self, request: Request, send: Send) -> int:
        path = request.path.rstrip("/") or "/"
        if path in ("/", "/apis", "/healthz"):
            if request.method not in ("GET", "HEAD"):
                err = MethodNotAllowed(f"{request.method} is not allowed on {path}; use GET")
                err.allow = ("GET",)  # type: ignore[attr-defined]
                raise err
            if path == "/healthz":
                await send_json(send, 200, {"status": "ok"}, request.request_id)
            else:
                apis = [served.describe() for served in self.registry.all()]
                await send_json(send, 200, {"apis": apis}, request.request_id)
            return 200
        raise unknown_path(request.path)


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
