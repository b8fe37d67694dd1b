"""AsyncAPI routes on the inference port (Cortex's AsyncAPI contract).

- `POST {endpoint}`: accept the request; 202 `{"id": ...}` once it is in the durable queue.
- `GET {endpoint}/{id}`: `{"id", "status", "result" | "error", "timestamp"}`, status one of
  in_queue, in_progress, completed, failed; 404 for an unknown or expired id.

`GET {endpoint}` (status), `{endpoint}/signature` and `{endpoint}/explain` stay
the native adapter's. This adapter runs before the native one (it claims an
AsyncAPI's endpoint, which is in the registry like any API's); on a server
without AsyncAPIs it costs one empty-dict check per request.

The adapter knows HTTP only: the manager it is given (kiln.control.asyncs
AsyncManager, reached through the server's job manager so the app's wiring
stays as it is) stores and runs the requests. A submission is an inference call
like any other: the data plane admits it before its body is read and meters it
once (with 202); running it later is never admitted or metered again. Errors use
the native shape.
"""

from __future__ import annotations

from typing import Any

from kiln.errors import KilnError, MethodNotAllowed, NotFound
from kiln.protocols.errors import native_error
from kiln.protocols.http import Request, Send, send_json
from kiln.serving.data_plane import Call, DataPlane

_NATIVE_ACTIONS = ("signature", "explain")


def async_routes(plane: DataPlane, jobs: Any) -> list[Any]:
    """The adapter, when the server has an AsyncAPI manager (`jobs.asyncs`); else none."""
    manager = getattr(jobs, "asyncs", None)
    if manager is None:
        return []
    manager.plane = plane
    return [AsyncRoutes(plane, manager)]


def _not_allowed(method: str, path: str, allowed: tuple[str, ...]) -> MethodNotAllowed:
    err = MethodNotAllowed(f"{method} is not allowed on {path}; use {' or '.join(allowed)}")
    err.allow = allowed  # type: ignore[attr-defined]
    return err


class AsyncRoutes:
    """Every AsyncAPI's endpoint: submit, then poll by id."""

    protocol = "async"

    def __init__(self, plane: DataPlane, manager: Any) -> None:
        self.plane = plane
        self.manager = manager
        self.endpoints: dict[str, str] = manager.endpoints  # kept current by the manager

    def route(self, request: Request, call: Call) -> tuple[Any, str] | None:
        endpoints = self.endpoints
        if not endpoints:
            return None
        path = request.path.rstrip("/") or "/"
        name = endpoints.get(path)
        request_id: str | None = None
        if name is None:
            head, _, tail = path.rpartition("/")
            name = endpoints.get(head or "/")
            if name is None or tail in _NATIVE_ACTIONS:
                return None
            request_id = tail
        elif request.method != "POST":
            return None  # GET {endpoint}: the native status answer
        if name not in call.view.groups:
            return None  # not the caller's: answered as a path nothing serves
        api = name

        async def handler(req: Request, send: Send, call: Call) -> int:
            return await self.handle(req, send, call, api, request_id)

        return handler, name

    def render_error(self, err: KilnError, request_id: str) -> dict[str, Any]:
        return native_error(err, request_id)

    async def handle(
        self, request: Request, send: Send, call: Call, name: str, request_id: str | None
    ) -> int:
        if request_id is None:
            version = request.query.get("version")
            served = self.plane.resolve(call, name, version, request.headers)
            self.plane.admit(call, served.name)
            body = await request.body(served.api.serving.max_request_bytes)
            new_id = await self.manager.submit(
                served, version, body, request.content_type or "application/json"
            )
            await send_json(send, 202, {"id": new_id}, request.request_id)
            return 202
        if request.method not in ("GET", "HEAD"):
            raise _not_allowed(request.method, request.path, ("GET",))
        doc = await self.manager.get(name, request_id)
        if doc is None:
            raise NotFound(
                f"no request {request_id!r} on AsyncAPI '{name}': the id is unknown, or its "
                f"result expired (async.result_ttl); POST to the endpoint to submit again"
            )
        await send_json(send, 200, doc, request.request_id)
        return 200
