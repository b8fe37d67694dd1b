"""TorchServe's inference API on Kiln's inference port (seed 004).

Routes (the model name is the API name, `{version}` the API's `version:`):

    GET  /ping                                  {"status": "Healthy"} 200 | "Unhealthy" 500
    POST /predictions/{model}[/{version}]       also PUT (`curl -T file` sends PUT)
    OPTIONS /predictions/{model}[/{version}]    that model's description (OpenAPI 3.0.1)
    POST /explanations/{model}[/{version}]      the handler's explain() or the built-in one

Explanations answer TorchServe's shape: the handler's own `explain()` answer as
it is, or the built-in explainer's attributions as bare nested lists, one per
input in signature order (what Captum returns through TorchServe); Kiln's
richer object with `?format=kiln` (handlers/explain.py).

Bodies reach the handler as TorchServe's do: JSON decoded, `text/*` as str,
anything else as bytes; `multipart/form-data` as parts in order (a multi-input
API gets them all, a single-input one the last). Errors use TorchServe's shape
`{"code", "type", "message"}` with its exception names.

TorchServe model names may contain `_` (`squeezenet1_1`); Kiln API names are
DNS labels, so an unknown name is looked up again with `_` read as `-`.
"""

from __future__ import annotations

from typing import Any

from kiln.errors import InvalidInput, KilnError, MethodNotAllowed, NotFound
from kiln.protocols.http import Request, Send, send_bytes, send_json
from kiln.protocols.multipart import MULTIPART, read_multipart
from kiln.protocols.streaming import stream_response, wants_sse
from kiln.serving.data_plane import Call, DataPlane
from kiln.serving.router import ApiGroup, Registry, RegistryView, ServedApi
from kiln.serving.types import InferenceRequest, InferenceResponse

_SYSTEM = "kiln"
_FORWARDED_HEADERS = ("content-type", "user-agent", "x-request-id", "accept")
_PREDICT_METHODS = ("POST", "PUT")

# Kiln's error types under the names TorchServe clients already match on.
_TS_TYPES = {
    "InvalidInput": "BadRequestException",
    "Unauthorized": "InvalidKeyException",
    "Forbidden": "ForbiddenException",
    "NotFound": "ModelNotFoundException",
    "MethodNotAllowed": "MethodNotAllowedException",
    "PayloadTooLarge": "RequestEntityTooLargeException",
    "UnsupportedMediaType": "UnsupportedMediaTypeException",
    "TooManyRequests": "TooManyRequestsException",
    "InferenceError": "InternalServerException",
    "InternalError": "InternalServerException",
    "NotImplemented": "NotImplementedException",
    "Unavailable": "ServiceUnavailableException",
    "Timeout": "RequestTimeoutException",
}


def torchserve_type(err: KilnError) -> str:
    """TorchServe's exception name for a Kiln error (a route may pin a finer one)."""
    pinned = getattr(err, "torchserve_type", None)
    if pinned:
        return pinned
    known = _TS_TYPES.get(err.type)
    if known:
        return known
    return "BadRequestException" if err.status < 500 else "InternalServerException"


def render_torchserve_error(err: KilnError, request_id: str = "") -> dict[str, Any]:
    return {"code": err.status, "type": torchserve_type(err), "message": err.message}


def find_group(registry: Registry | RegistryView, name: str) -> ApiGroup | None:
    """The API a TorchServe-style model name means: exact, else with `_` read as `-`."""
    group = registry.groups.get(name)
    if group is None:
        alias = name.replace("_", "-").lower()
        if alias != name:
            group = registry.groups.get(alias)
    return group


def model_not_found(registry: Registry | RegistryView, name: str) -> NotFound:
    known = ", ".join(sorted(registry.groups)) or "none"
    return NotFound(f"Model not found: {name} (models served here: {known})")


def resolve(registry: Registry | RegistryView, name: str, version: str | None) -> ServedApi:
    """The API version a TorchServe path names; 404 in TorchServe's terms otherwise."""
    group = find_group(registry, name)
    if group is None:
        raise model_not_found(registry, name)
    if version is None:
        return group.default
    served = group.versions.get(version)
    if served is None:
        known = ", ".join(sorted(str(v) for v in group.versions if v is not None)) or "none"
        err = NotFound(
            f"Model version: {version} does not exist for model: {name} (versions: {known})"
        )
        err.torchserve_type = "ModelVersionNotFoundException"  # type: ignore[attr-defined]
        raise err
    return served


EXPLANATION_FORMATS = ("torchserve", "kiln")


def check_explanation_format(request: Request) -> None:
    """`?format=` on an explanation route names a shape Kiln answers in, or it is a 400."""
    wanted = request.query.get("format")
    if wanted is not None and wanted not in EXPLANATION_FORMATS:
        raise InvalidInput(
            f"unknown explanation format {wanted!r}: leave format out for TorchServe's "
            f"attribution lists, or send ?format=kiln for Kiln's explanation object"
        )


def method_not_allowed(request: Request, allowed: tuple[str, ...]) -> MethodNotAllowed:
    err = MethodNotAllowed(
        f"{request.method} is not allowed on {request.path}; use {' or '.join(allowed)}"
    )
    err.allow = allowed  # type: ignore[attr-defined]
    return err


def streams(served: ServedApi, request: Request) -> bool:
    """Whether a TorchServe prediction streams (see docs/protocols.md).

    TorchServe streams whenever the handler sends intermediate responses, with
    no opt-in from the client; Kiln cannot see from the gateway that a handler
    is a generator, so the API says so with `streaming: true` under `metadata:`
    or `config:`. A client can also ask with `Accept: text/event-stream`.
    """
    return declares_streaming(served.api) or wants_sse(request)


def declares_streaming(api: Any) -> bool:
    """`streaming: true` under the API's `metadata:` or `config:` in kiln.yaml."""
    declared = (api.metadata or {}).get("streaming") or (api.config or {}).get("streaming")
    return _truthy(declared)


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


async def build_request(
    request: Request, served: ServedApi, body: bytes, protocol: str = "torchserve"
) -> InferenceRequest:
    """The internal request for a TorchServe-style body (raw bytes or multipart parts).

    A multipart body is parsed within docs/protocols.md's limits, and off the
    event loop when it is large (kiln.protocols.multipart).
    """
    headers = {k: v for k, v in request.headers.items() if k in _FORWARDED_HEADERS}
    inference = InferenceRequest(
        api=served.name,
        version=served.version,
        request_id=request.request_id,
        body=body,
        content_type=request.content_type,
        protocol=protocol,
        headers=headers,
        query=dict(request.query),
        kind="raw",
    )
    if request.content_type == MULTIPART:
        inference.kind = "parts"
        inference.parts = await read_multipart(
            body,
            request.headers.get("content-type", ""),
            max_part_bytes=served.api.serving.max_request_bytes,
        )
        inference.body = b""
    return inference


_FRAMING = ("content-type", "content-length", "transfer-encoding")


async def send_response(send: Send, response: InferenceResponse, request_id: str) -> int:
    """The handler's answer as is; its Content-Type is already `response.content_type`."""
    extra = {k: v for k, v in response.headers.items() if k.lower() not in _FRAMING}
    await send_bytes(
        send, response.status, response.body, response.content_type, request_id, extra or None
    )
    return response.status


class TorchServeInference:
    """`/ping`, `/predictions/...` and `/explanations/...` in TorchServe's shapes."""

    owns = ("ping", "predictions", "explanations")  # see KServeV1.owns

    def __init__(self, plane: DataPlane, log: Any) -> None:
        self.plane = plane
        self.log = log

    def render_error(self, err: KilnError, request_id: str) -> dict[str, Any]:
        return render_torchserve_error(err, request_id)

    def route(self, request: Request, call: Call) -> tuple[Any, str] | None:
        path = request.path.rstrip("/")
        if path == "/ping":
            return self._ping, _SYSTEM
        head, _, rest = path.lstrip("/").partition("/")
        if head not in ("predictions", "explanations"):
            return None
        segments = rest.split("/") if rest else []
        if not 1 <= len(segments) <= 2 or not all(segments):
            return self._bad_path, _SYSTEM
        name = segments[0]
        version = segments[1] if len(segments) == 2 else None
        group = find_group(call.view, name)
        api_name = group.name if group is not None else _SYSTEM

        async def handler(req: Request, send: Send, call: Call) -> int:
            found = find_group(call.view, name) if version is None else None
            if found is not None and req.method != "OPTIONS":
                served = self.plane.pick(call, found, None, req.headers)  # the traffic split
            else:
                served = resolve(call.view, name, version)
            if head == "explanations":
                return await self._explain(req, send, call, served)
            return await self._predict(req, send, call, served, name)

        return handler, api_name

    async def _bad_path(self, request: Request, send: Send, call: Call) -> int:
        raise NotFound(
            f"no route {request.path}; use /predictions/{{model}}[/{{version}}] or "
            f"/explanations/{{model}}[/{{version}}]"
        )

    async def _ping(self, request: Request, send: Send, call: Call) -> int:
        if request.method not in ("GET", "HEAD", "POST"):
            raise method_not_allowed(request, ("GET",))
        # Like TorchServe: Unhealthy (500) until every model has loaded, then while one fails.
        apis = self.plane.registry.all()
        healthy = all(s.healthy() and s.state != "loading" for s in apis)
        status = 200 if healthy else 500
        await send_json(
            send, status, {"status": "Healthy" if healthy else "Unhealthy"}, request.request_id
        )
        return status

    async def _predict(
        self, request: Request, send: Send, call: Call, served: ServedApi, name: str
    ) -> int:
        if request.method == "OPTIONS":
            group = find_group(call.view, name)
            versions = sorted(str(v) for v in (group.versions if group else {}) if v is not None)
            await send_json(send, 200, describe(served, name, versions), request.request_id)
            return 200
        if request.method not in _PREDICT_METHODS:
            raise method_not_allowed(request, (*_PREDICT_METHODS, "OPTIONS"))
        plane = self.plane
        plane.admit(call, served.name)
        body = await request.body(served.api.serving.max_request_bytes)
        inference = await build_request(request, served, body)
        if streams(served, request):
            return await stream_response(
                request,
                send,
                plane.stream(call, served, inference),
                sse=wants_sse(request),
                error_body=render_torchserve_error,
            )
        response = await plane.predict(call, served, inference)
        return await send_response(send, response, request.request_id)

    async def _explain(self, request: Request, send: Send, call: Call, served: ServedApi) -> int:
        if request.method not in _PREDICT_METHODS:
            raise method_not_allowed(request, _PREDICT_METHODS)
        check_explanation_format(request)
        self.plane.admit(call, served.name)
        body = await request.body(served.api.serving.max_request_bytes)
        inference = await build_request(request, served, body)
        response = await self.plane.explain(call, served, inference)
        return await send_response(send, response, request.request_id)


def describe(served: ServedApi, name: str, versions: list[str]) -> dict[str, Any]:
    """`OPTIONS /predictions/{model}`: a small OpenAPI 3.0.1 document for one model.

    TorchServe answers this with the model's own API description; Kiln also
    states what it knows that TorchServe does not: the signature, the versions,
    whether the route streams and whether explanations are available.
    """
    api = served.api
    bodies = {
        "application/json": {"schema": {}},
        "text/plain": {"schema": {"type": "string"}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {"data": {"type": "string", "format": "binary"}},
            }
        },
    }
    errors = {
        "400": "The input cannot be read by this model (BadRequestException)",
        "404": "Model or version not found (ModelNotFoundException)",
        "413": "The body is larger than serving.max_request_bytes, or a multipart body has "
        "more parts or fields than Kiln takes (docs/protocols.md)",
        "500": "The model or handler failed (InternalServerException)",
        "503": "No worker is ready (ServiceUnavailableException); retry after Retry-After",
    }
    responses: dict[str, Any] = {
        "200": {
            "description": "The model's answer: JSON, text or bytes, as the handler returns it",
            "content": {"*/*": {"schema": {}}},
        },
        **{code: {"description": text} for code, text in errors.items()},
    }

    def operation(operation_id: str, description: str) -> dict[str, Any]:
        return {
            "description": description,
            "operationId": operation_id,
            "requestBody": {"description": "Input data for the model", "content": bodies},
            "responses": responses,
        }

    predict = f"A predict entry point for model: {name}."
    paths: dict[str, Any] = {
        f"/predictions/{name}": {
            "post": operation(name, predict),
            "put": operation(f"{name}-put", predict),
        }
    }
    if served.version is not None:
        paths[f"/predictions/{name}/{served.version}"] = {
            "post": operation(f"{name}-{served.version}", predict),
            "put": operation(f"{name}-{served.version}-put", predict),
        }
    if served.can_explain:
        paths[f"/explanations/{name}"] = {
            "post": operation(f"{name}-explain", f"Explanations for model: {name}.")
        }
    return {
        "openapi": "3.0.1",
        "info": {
            "title": f"RESTful API for: {name}",
            "version": served.version or "1.0",
            "description": f"Kiln API '{served.name}' ({api.runtime} runtime)",
        },
        "paths": paths,
        "x-kiln": {
            "api": served.name,
            "version": served.version,
            "versions": versions,
            "status": served.state,
            "runtime": api.runtime,
            "signature": served.signature,
            "streaming": declares_streaming(api),
            "explain": served.can_explain,
            "max_request_bytes": api.serving.max_request_bytes,
        },
    }
