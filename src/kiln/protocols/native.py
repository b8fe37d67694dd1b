"""Kiln's native JSON API: `POST {endpoint}` predicts, `GET {endpoint}` pings and loads.

`POST {endpoint}/explain` answers Kiln's explanation object (handlers/explain.py):
the handler's `explain()`, or the built-in explainer's method, baseline, output,
target and attributions by input name.

Success bodies carry only the result, so the same request gives the same body;
the request id travels in `X-Request-ID`. Errors use the native shape
`{"error": {"type", "message"}, "request_id"}`.
"""

from __future__ import annotations

import time
from typing import Any

from kiln.errors import KilnError, MethodNotAllowed, NotFound
from kiln.protocols.errors import native_error
from kiln.protocols.http import Request, Send, send_bytes, send_json
from kiln.serving.data_plane import Call, DataPlane
from kiln.serving.router import ApiGroup, ServedApi
from kiln.serving.types import InferenceRequest

_FORWARDED_HEADERS = ("content-type", "user-agent", "x-request-id")


def _method_not_allowed(allowed: tuple[str, ...], path: str, method: str) -> MethodNotAllowed:
    err = MethodNotAllowed(f"{method} is not allowed on {path}; use {' or '.join(allowed)}")
    err.allow = allowed  # type: ignore[attr-defined]
    return err


class NativeApi:
    """Routes for the APIs' own endpoints."""

    protocol = "native"

    def __init__(self, plane: DataPlane, log: Any) -> None:
        self.plane = plane
        self.log = log

    def route(self, request: Request, call: Call) -> tuple[Any, str] | None:
        matched = self.match(request.path, call)
        if matched is None:
            return None
        group, action = matched

        async def handler(req: Request, send: Send, call: Call) -> int:
            return await self.handle(req, send, call, group, action)

        return handler, group.name

    def render_error(self, err: KilnError, request_id: str) -> dict[str, Any]:
        return native_error(err, request_id)

    def match(self, path: str, call: Call) -> tuple[ApiGroup, str] | None:
        """(group, action) for a native path, or None when the path is not an API's
        (or not one the caller may see)."""
        view = call.view
        group = view.by_endpoint(path)
        if group is not None:
            return group, "predict"
        for action in ("signature", "explain"):
            if path.endswith("/" + action):
                group = view.by_endpoint(path[: -len(action) - 1])
                if group is not None:
                    return group, action
        return None

    async def handle(
        self, request: Request, send: Send, call: Call, group: ApiGroup, action: str
    ) -> int:
        version = request.query.get("version")
        if action == "explain" or (action == "predict" and request.method == "POST"):
            served = self.plane.pick(call, group, version, request.headers)
        else:
            served = group.get(version)
        if action == "signature":
            if request.method != "GET":
                raise _method_not_allowed(("GET",), request.path, request.method)
            await self.plane.wait_ready(call, served)
            await send_json(send, 200, _signature_body(served), request.request_id)
            return 200
        if action == "explain":
            if request.method != "POST":
                raise _method_not_allowed(("POST",), request.path, request.method)
            return await self._predict(request, send, call, served, explain=True)
        if request.method == "GET":
            await self.plane.wait_ready(call, served)
            await send_json(send, 200, _status_body(served), request.request_id)
            return 200
        if request.method != "POST":
            raise _method_not_allowed(("GET", "POST"), request.path, request.method)
        return await self._predict(request, send, call, served)

    async def _predict(
        self, request: Request, send: Send, call: Call, served: ServedApi, explain: bool = False
    ) -> int:
        self.plane.admit(call, served.name)
        body = await request.body(served.api.serving.max_request_bytes)
        debug = request.flag("debug")
        given = request.headers
        headers = {k: given[k] for k in _FORWARDED_HEADERS if k in given}
        query = {k: v for k, v in request.query.items() if k not in ("debug", "version")}
        inference = InferenceRequest(
            api=served.name,
            version=served.version,
            request_id=request.request_id,
            body=body,
            content_type=request.content_type or "application/json",
            protocol="native",
            headers=headers,
            query=query,
            debug=debug,
        )
        run = self.plane.explain if explain else self.plane.predict
        try:
            response = await run(call, served, inference)
        except KilnError as err:
            self._log_debug(served.name, request.request_id, getattr(err, "debug_stages", ()))
            raise
        self._log_debug(served.name, request.request_id, response.debug_stages)
        await send_bytes(
            send,
            response.status,
            response.body,
            response.content_type,
            request.request_id,
            response.headers or None,
        )
        return response.status

    def _log_debug(self, api: str, request_id: str, stages: Any) -> None:
        for index, (stage, value) in enumerate(stages or (), start=1):
            self.log.write(
                api,
                {
                    "event": "debug",
                    "request_id": request_id,
                    "step": index,
                    "stage": stage,
                    "value": value,
                },
            )


def _signature_body(served: ServedApi) -> dict[str, Any]:
    signature = served.signature
    # Seed-era replicas answered {"signature": {name: {"shape", "type"}}}; keep that shape.
    by_name = {
        spec["name"]: {"shape": spec.get("shape"), "type": spec.get("datatype")}
        for spec in signature.get("inputs", [])
    }
    return {
        "signature": by_name,
        "inputs": signature.get("inputs", []),
        "outputs": signature.get("outputs", []),
    }


def _status_body(served: ServedApi) -> dict[str, Any]:
    return {
        "status": served.state,
        "api": served.name,
        "version": served.version,
        "endpoint": served.api.endpoint,
        "runtime": served.api.runtime,
        "signature": served.signature,
        "metadata": served.api.metadata,
        "message": f"send a POST request with a JSON body to {served.api.endpoint} to predict",
    }


def unknown_path(path: str) -> NotFound:
    return NotFound(f"no API is served at {path}; GET /apis lists the APIs and their endpoints")


def now_ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 2)
