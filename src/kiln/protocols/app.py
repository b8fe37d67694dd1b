"""The inference port: one raw ASGI app that hands each request to the adapter owning its path.

Adapters are tried in order; each returns a handler for paths it serves and
renders errors in its own protocol's shape. Paths no adapter claims get the
native 404. This app authenticates the key (protocols/auth.py) and opens the
request's `Call` on the data plane (serving/data_plane.py), which the adapter's
handler gets explicitly; after the answer it asks the data plane to meter the
call (once, only if it was admitted) and to map the error the caller sees.
"""

from __future__ import annotations

import asyncio
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from kiln.errors import InvalidInput, KilnError, MethodNotAllowed, NotFound
from kiln.protocols.auth import OPEN_PATHS, authenticate
from kiln.protocols.bookkeeping import Bookkeeping
from kiln.protocols.errors import error_headers, native_error
from kiln.protocols.http import Receive, Request, Scope, Send, send_json
from kiln.protocols.native import NativeApi, unknown_path
from kiln.serving.data_plane import Call, DataPlane
from kiln.serving.router import Registry

Handler = Callable[[Request, Send, Call], Awaitable[int]]
_SYSTEM = "kiln"


class Adapter(Protocol):
    """A protocol's routes on the inference port."""

    def route(self, request: Request, call: Call) -> tuple[Handler, str] | None:
        """(handler, api name for logs) when this adapter serves the request's path,
        looking APIs up in `call.view` (what the caller may see)."""

    def render_error(self, err: KilnError, request_id: str) -> dict[str, Any]:
        """The error body in this protocol's shape."""

    # Optional: `scope_of(request) -> "invoke" | "manage"`, the key scope a route needs
    # (e.g. V2's repository extension, which loads and unloads models); "invoke" without it.
    # Optional: `owns`, the first path segments only this adapter serves ("v2"): such
    # paths go to it first. They are reserved names (config/blocks.py RESERVED_NAMES), so
    # no API endpoint, and no adapter before it, can claim them.


def default_adapters(plane: DataPlane, log: Any, jobs: Any = None) -> list[Adapter]:
    from kiln.protocols.async_api import async_routes
    from kiln.protocols.kserve_v1 import KServeV1
    from kiln.protocols.openapi import OpenApiRoutes
    from kiln.protocols.torchserve import TorchServeInference
    from kiln.protocols.v2 import OpenInferenceV2

    # Native first: it is an exact dictionary lookup, and config validation keeps API
    # endpoints off the protocol prefixes, so no other adapter can claim its paths.
    protocols: list[Adapter] = [
        NativeApi(plane, log),
        TorchServeInference(plane, log),
        KServeV1(plane, log),
        OpenInferenceV2(plane, log),
    ]
    adapters: list[Adapter] = [*protocols, OpenApiRoutes(plane, log, probes=protocols)]
    if jobs is not None:  # Batch APIs (kiln.batch.manager.JobManager): right after native
        from kiln.protocols.batch import BatchRoutes

        adapters.insert(1, BatchRoutes(plane, jobs))
    adapters[:0] = async_routes(plane, jobs)  # AsyncAPIs: before native claims their endpoint
    return adapters


class InferenceApp:
    """Serves every protocol of every API on one port."""

    def __init__(
        self,
        registry: Registry,
        log: Any,
        adapters: list[Adapter] | None = None,
        metrics: Any = None,
        auth: Any = None,
        jobs: Any = None,
    ) -> None:
        self.registry = registry
        self.log = log
        self.metrics = metrics
        # API keys (control/accounts.py + quotas.py), or None: auth off (`kiln serve`).
        self.auth = auth
        self.books = Bookkeeping(metrics, log, _SYSTEM)
        # Admission and metering go through the data plane, never through this app.
        self.plane = DataPlane(registry, auth, log=log)
        self.adapters = (
            adapters if adapters is not None else default_adapters(self.plane, log, jobs)
        )
        self._owners = {seg: a for a in self.adapters for seg in getattr(a, "owns", ())}

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
        renderer: Callable[[KilnError, str], dict[str, Any]] = native_error
        protocol = "native"
        call = self.plane.call(None)
        started_response = _ResponseTracker(send, call)
        cancelled = False
        trace = request.trace  # serving/tracing.py: None unless tracing is on
        try:
            routed, adapter = self._route(request, call)
            if routed is not None:
                renderer = adapter.render_error
                protocol = getattr(adapter, "protocol", type(adapter).__name__.lower())
                api_name = routed[1]
            if trace is not None:
                trace.step("kiln.route")
            if self.auth is not None and request.path not in OPEN_PATHS:
                scope_of = getattr(adapter, "scope_of", None)
                needs = scope_of(request) if scope_of is not None else "invoke"
                principal = authenticate(self.auth, request, needs)
                if trace is not None:
                    trace.step("kiln.auth")
                call = started_response.call = self.plane.call(principal)
                if api_name != _SYSTEM and not principal.sees(api_name):
                    # Not theirs: route again with their view, so the protocol answers
                    # exactly as it does for an API that does not exist.
                    routed, adapter = self._route(request, call)
                    api_name = routed[1] if routed is not None else _SYSTEM
                    if api_name != _SYSTEM and not principal.sees(api_name):
                        raise unknown_path(request.path)  # an adapter that does not filter
            if api_name != _SYSTEM:
                call.api = api_name
            call.trace = trace
            if routed is not None:
                status = await routed[0](request, started_response, call)
            else:
                status = await self._system_route(request, started_response, call)
        except KilnError as raised:
            err = self.plane.public_error(call, raised)
            status = err.status
            if not started_response.started:
                await send_json(
                    started_response,
                    status,
                    renderer(err, request.request_id),
                    request.request_id,
                    error_headers(err),
                )
        except Exception:  # a bug in Kiln itself: log it, never show it
            traceback.print_exc(file=sys.stderr)
            status = 500
            if not started_response.started:
                err = KilnError("internal server error; the details are in the server log")
                await send_json(send, 500, renderer(err, request.request_id), request.request_id)
        except asyncio.CancelledError:  # the client left and the HTTP layer cancelled this
            status, cancelled = 499, True  # nginx's "client closed request": logged, then gone
        self.plane.finish(call, status)
        elapsed = time.perf_counter() - started
        if trace is not None:
            trace.finish(status, call.api, call.version, request.path, protocol)
        record: dict[str, Any] | None = None
        if api_name != _SYSTEM or status >= 400:
            record = {
                "event": "request",
                "method": request.method,
                "path": request.path,
                "status": status,
                "latency_ms": round(elapsed * 1000, 2),
                "request_id": request.request_id,
            }
            if trace is not None:
                record["trace_id"] = trace.trace_id
                record["span_id"] = trace.span_id
        # Metrics and the log line: for this loop turn's answers together (bookkeeping.py).
        self.books.answered(api_name, protocol, status, elapsed, call.version, record)
        if cancelled:
            raise asyncio.CancelledError

    def _route(self, request: Request, call: Call) -> tuple[tuple[Handler, str] | None, Any]:
        owner = self._owners.get(request.path[1:].partition("/")[0])
        if owner is not None:  # /v2/..., /v1/..., /predictions/...: skip the adapters before
            routed = owner.route(request, call)
            if routed is not None:
                return routed, owner
        for adapter in self.adapters:
            routed = adapter.route(request, call)
            if routed is not None:
                return routed, adapter
        return None, None

    async def _system_route(self, request: Request, send: Send, call: Call) -> int:
        path = request.path.rstrip("/") or "/"
        if path.startswith("/apis/") and path.endswith("/monitoring"):
            name = path[len("/apis/") : -len("/monitoring")]
            return await self._monitoring(request, send, call, name)
        if path in ("/", "/apis", "/healthz"):
            if request.method not in ("GET", "HEAD"):
                err = MethodNotAllowed(f"{request.method} is not allowed on {path}; use GET")
                err.allow = ("GET",)  # type: ignore[attr-defined]
                raise err
            if path == "/healthz":
                await send_json(send, 200, {"status": "ok"}, request.request_id)
            else:
                apis = [self._describe(call, served) for served in call.view.all()]
                await send_json(send, 200, {"apis": apis}, request.request_id)
            return 200
        raise unknown_path(request.path)

    def _describe(self, call: Call, served: Any) -> dict[str, Any]:
        info: dict[str, Any] = served.describe()
        if "error" in info:
            info["error"] = self.plane.shown_error(call, served)
        return info

    async def _monitoring(self, request: Request, send: Send, call: Call, name: str) -> int:
        """`GET /apis/{name}/monitoring?window=1h`: the tracker's summary (seed `tracker:`)."""
        from kiln.config.quantities import parse_duration

        served = self.plane.lookup(call, name, request.query.get("version"))
        if served.api.tracker is None or self.metrics is None:
            raise NotFound(
                f"API '{name}' has no tracker; add `tracker: {{model_type: classification}}` "
                f"(or regression, with `key:` for object answers) to its kiln.yaml entry"
            )
        try:
            window = parse_duration(request.query.get("window", "1h"))
        except ValueError as exc:
            raise InvalidInput(f"window: {exc}; use e.g. window=15m or window=1h") from None
        summary = self.metrics.monitor.summary(served.name, served.version or "", window)
        await send_json(send, 200, summary, request.request_id)
        return 200


class _ResponseTracker:
    """Wraps `send` to know whether a response has started (then errors cannot be sent),
    and to add the call's X-RateLimit-* headers (set by the data plane's admission)."""

    __slots__ = ("_send", "started", "call", "_respond")

    def __init__(self, send: Send, call: Call) -> None:
        self._send = send
        self.started = False
        self.call = call
        # Kiln's HTTP layer answers a complete response in one call (Exchange.respond).
        self._respond = getattr(getattr(send, "__self__", None), "respond", None)

    def respond(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> bool:
        """A complete answer without ASGI messages where the HTTP layer can take it (False:
        send it as messages, `http.send_bytes` does). Same headers as `__call__` adds."""
        respond = self._respond
        if respond is None or self.started:
            return False
        extra = self.call.rate_headers
        self.started = True  # as at `http.response.start`: a failure now cannot be answered
        if not respond(status, [*headers, *extra] if extra else headers, body):
            self.started = False
            return False
        return True

    async def __call__(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.started = True
            extra = self.call.rate_headers
            if extra:
                message = {**message, "headers": [*message.get("headers", ()), *extra]}
        await self._send(message)


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
