"""The inference port described as OpenAPI 3.0, generated from what is actually served.

`OPTIONS /` and `GET /api-description` (TorchServe's names) and `GET /openapi.json`
return the document; `GET /docs` renders it as one self-contained HTML page
(no scripts, nothing fetched from elsewhere).

Nothing here is written per API. `ROUTES` is the table of every route shape the
inference port knows; the document expands each shape for every API and version
in the registry (`/predictions/{model}` becomes `/predictions/iris`) and keeps
only the paths one of the live adapters actually claims, so a protocol that is
switched off, or a route an adapter does not serve, never appears. TorchServe's
templated paths (`/predictions/{model_name}`, ...; `openapi_templates.py`) are
listed too, as TorchServe's own description lists them, for generated clients.

This module decides *which* operations exist and assembles the document. What
each operation's parameters, request bodies and responses look like (schemas and
examples from each version's real signature: input names, V2 datatypes, shapes)
lives in `openapi_schemas.py`; the `/docs` HTML page is `openapi_docs.py`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import kiln
from kiln.errors import KilnError, MethodNotAllowed
from kiln.protocols.errors import native_error
from kiln.protocols.http import Request, Send, send_bytes, send_json
from kiln.protocols.openapi_docs import render_docs
from kiln.protocols.openapi_schemas import (
    _COMPONENTS,
    _parameters,
    _request_body,
    _responses,
    _signature_text,
)
from kiln.protocols.openapi_templates import templated_paths
from kiln.serving.data_plane import Call, DataPlane
from kiln.serving.router import ApiGroup, Registry, RegistryView, ServedApi

OPENAPI_VERSION = "3.0.1"
_DOC_PATHS = ("/api-description", "/openapi.json", "/docs")


@dataclass(frozen=True)
class RouteSpec:
    """One route shape of the inference port.

    `scope` says how the template expands: "server" (as is), "api" (once per
    API: `{model}` is its name, `{endpoint}` its endpoint) or "version" (once
    per named version: `{version}`). `body` names the request schema family
    and `errors` the error shape the route answers with.
    """

    protocol: str
    method: str
    template: str
    scope: str
    summary: str
    body: str | None = None
    errors: str = "native"
    always: bool = False  # served by the app itself or by this module: no probe needed


ROUTES: tuple[RouteSpec, ...] = (
    # The server itself (protocols/app.py) and this module.
    RouteSpec("server", "get", "/", "server", "The APIs this server has", always=True),
    RouteSpec("server", "options", "/", "server", "This OpenAPI document", always=True),
    RouteSpec("server", "get", "/api-description", "server", "This OpenAPI document", always=True),
    RouteSpec("server", "get", "/openapi.json", "server", "This OpenAPI document", always=True),
    RouteSpec("server", "get", "/docs", "server", "This document as an HTML page", always=True),
    RouteSpec("server", "get", "/apis", "server", "Every API version and its state", always=True),
    RouteSpec("server", "get", "/healthz", "server", "Liveness of the server", always=True),
    # Kiln's native API at each API's own endpoint.
    RouteSpec("native", "post", "{endpoint}", "api", "Predict", body="native"),
    RouteSpec("native", "get", "{endpoint}", "api", "Status; the first call loads the model"),
    RouteSpec("native", "get", "{endpoint}/signature", "api", "Input and output tensors"),
    RouteSpec("native", "post", "{endpoint}/explain", "api", "Explain", body="native"),
    # TorchServe inference API.
    RouteSpec("torchserve", "get", "/ping", "server", "Health of every model", errors="torchserve"),
    RouteSpec(
        "torchserve",
        "post",
        "/predictions/{model}",
        "api",
        "Predict with the default version",
        body="torchserve",
        errors="torchserve",
    ),
    RouteSpec(
        "torchserve",
        "options",
        "/predictions/{model}",
        "api",
        "Describe this model (TorchServe's per-model description)",
        errors="torchserve",
    ),
    RouteSpec(
        "torchserve",
        "post",
        "/predictions/{model}/{version}",
        "version",
        "Predict with this version",
        body="torchserve",
        errors="torchserve",
    ),
    RouteSpec(
        "torchserve",
        "post",
        "/explanations/{model}",
        "api",
        "Explain with the default version",
        body="torchserve",
        errors="torchserve",
    ),
    RouteSpec(
        "torchserve",
        "post",
        "/explanations/{model}/{version}",
        "version",
        "Explain with this version",
        body="torchserve",
        errors="torchserve",
    ),
    # KServe V1.
    RouteSpec("kserve-v1", "get", "/v1/models", "server", "Model names", errors="kserve"),
    RouteSpec("kserve-v1", "get", "/v1/models/{model}", "api", "Readiness", errors="kserve"),
    RouteSpec(
        "kserve-v1",
        "post",
        "/v1/models/{model}:predict",
        "api",
        "Predict instances",
        body="v1",
        errors="kserve",
    ),
    RouteSpec(
        "kserve-v1",
        "post",
        "/v1/models/{model}:explain",
        "api",
        "Explain instances",
        body="v1",
        errors="kserve",
    ),
    # Open Inference Protocol (KServe V2).
    RouteSpec("v2", "get", "/v2", "server", "Server metadata", errors="kserve"),
    RouteSpec("v2", "get", "/v2/health/live", "server", "Liveness", errors="kserve"),
    RouteSpec(
        "v2", "get", "/v2/health/ready", "server", "Readiness of all models", errors="kserve"
    ),
    RouteSpec("v2", "get", "/v2/models", "server", "Model names", errors="kserve"),
    RouteSpec("v2", "get", "/v2/models/{model}", "api", "Model metadata", errors="kserve"),
    RouteSpec("v2", "get", "/v2/models/{model}/ready", "api", "Model readiness", errors="kserve"),
    RouteSpec("v2", "post", "/v2/models/{model}/infer", "api", "Infer", body="v2", errors="kserve"),
    RouteSpec(
        "v2",
        "get",
        "/v2/models/{model}/versions/{version}",
        "version",
        "Metadata of this version",
        errors="kserve",
    ),
    RouteSpec(
        "v2",
        "get",
        "/v2/models/{model}/versions/{version}/ready",
        "version",
        "Readiness of this version",
        errors="kserve",
    ),
    RouteSpec(
        "v2",
        "post",
        "/v2/models/{model}/versions/{version}/infer",
        "version",
        "Infer with this version",
        body="v2",
        errors="kserve",
    ),
    RouteSpec(
        "v2", "post", "/v2/repository/index", "server", "Every model and its state", errors="kserve"
    ),
    RouteSpec(
        "v2",
        "post",
        "/v2/repository/models/{model}/load",
        "api",
        "Start the model's workers",
        errors="kserve",
    ),
    RouteSpec(
        "v2",
        "post",
        "/v2/repository/models/{model}/unload",
        "api",
        "Stop the model's workers (requests get 503 until load)",
        errors="kserve",
    ),
)

_TAGS = {
    "server": "Server",
    "native": "Kiln native",
    "torchserve": "TorchServe",
    "kserve-v1": "KServe V1",
    "v2": "Open Inference Protocol (V2)",
}


@dataclass(frozen=True)
class Operation:
    """One concrete (path, method) of the document, with the API version it serves."""

    route: RouteSpec
    path: str
    group: ApiGroup | None
    served: ServedApi | None


# ----- the adapter ---------------------------------------------------------------------
class OpenApiRoutes:
    """`OPTIONS /`, `/api-description`, `/openapi.json` and `/docs` on the inference port."""

    def __init__(self, plane: DataPlane, log: Any, probes: list[Any] | None = None) -> None:
        """`probes`: the port's protocol adapters, asked which concrete paths they serve
        (app.default_adapters hands them over, so this module never imports app.py)."""
        self.plane = plane
        self.log = log
        self._probes: list[Any] = list(probes or [])

    def route(self, request: Request, call: Call) -> tuple[Any, str] | None:
        path = request.path.rstrip("/") or "/"
        if path == "/":
            if request.method != "OPTIONS":
                return None  # GET / is the server's own route
            return self._serve_document, "kiln"
        if path in _DOC_PATHS:
            return self._serve_document, "kiln"
        return None

    def render_error(self, err: KilnError, request_id: str) -> dict[str, Any]:
        return native_error(err, request_id)

    async def _serve_document(self, request: Request, send: Send, call: Call) -> int:
        path = request.path.rstrip("/") or "/"
        allowed = ("OPTIONS",) if path == "/" else ("GET", "HEAD")
        if request.method not in allowed:
            err = MethodNotAllowed(f"{request.method} is not allowed on {path}; use GET")
            err.allow = allowed  # type: ignore[attr-defined]
            raise err
        document = self.document(_base_url(request), call)
        if path == "/docs":
            page = render_docs(document).encode()
            await send_bytes(
                send,
                200,
                page,
                "text/html; charset=utf-8",
                request.request_id,
                {"Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'"},
            )
        else:
            await send_json(send, 200, document, request.request_id)
        return 200

    # ----- generation ----------------------------------------------------------------
    def probes(self) -> list[Any]:
        """The inference port's other adapters, asked which concrete paths they serve."""
        return self._probes

    def is_served(self, method: str, path: str, call: Call) -> bool:
        """True when an adapter claims `method path` (its handler may still answer 4xx)."""
        request = probe_request(method, path)
        for adapter in self.probes():
            try:
                if adapter.route(request, call) is not None:
                    return True
            except KilnError:
                return True  # claimed, and refused in that protocol's own shape
        return False

    def operations(self, call: Call) -> list[Operation]:
        """Every concrete operation the inference port serves right now, to this caller."""
        found = []
        for op in expand(call.view):
            if op.route.always or self.is_served(op.route.method.upper(), op.path, call):
                found.append(op)
        return found

    def document(self, base_url: str, call: Call) -> dict[str, Any]:
        templated = templated_paths(
            lambda method, path: self.is_served(method, path, call), sorted(call.view.groups)
        )
        return build_document(self.operations(call), base_url, templated)


def probe_request(method: str, path: str) -> Request:
    """A bodiless request for asking an adapter's `route()` whether it owns `path`."""

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    scope = {"type": "http", "method": method, "path": path, "headers": [], "query_string": b""}
    return Request(scope, receive)


def expand(registry: Registry | RegistryView) -> Iterator[Operation]:
    """Every route shape made concrete for the APIs and versions in `registry`."""
    groups = sorted(registry.groups.values(), key=lambda g: g.name)
    for route in ROUTES:
        if route.scope == "server":
            yield Operation(route, route.template, None, None)
            continue
        for group in groups:
            if not group.versions:
                continue
            if route.scope == "api":
                path = route.template.format(endpoint=group.endpoint, model=group.name)
                yield Operation(route, path, group, group.default)
                continue
            for version in sorted((v for v in group.versions if v is not None), key=str):
                path = route.template.format(model=group.name, version=version)
                yield Operation(route, path, group, group.versions[version])


# ----- the document -------------------------------------------------------------------
def build_document(
    operations: list[Operation],
    base_url: str = "",
    templated: dict[str, dict[str, Any]] | None = None,
) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    # Templated operations keep TorchServe's operationIds; concrete ones avoid them.
    used_ids = {op["operationId"] for item in (templated or {}).values() for op in item.values()}
    for op in operations:
        item = paths.setdefault(op.path, {})
        item[op.route.method] = _operation(op, used_ids)
    for path, methods in (templated or {}).items():
        paths.setdefault(path, {}).update(methods)
    document: dict[str, Any] = {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "Kiln APIs",
            "version": kiln.__version__,
            "description": (
                "Every route this Kiln server answers on its inference port: the native "
                "API at each endpoint, the TorchServe inference API, KServe V1 and the Open "
                "Inference Protocol (V2), once per model with its input schema, and "
                "TorchServe's templated paths ({model_name}). Generated from the running "
                "server."
            ),
        },
        "tags": [{"name": name} for name in _TAGS.values()],
        "paths": paths,
        "components": {"schemas": _COMPONENTS},
    }
    if base_url:
        document["servers"] = [{"url": base_url}]
    return document


def _operation(op: Operation, used_ids: set[str]) -> dict[str, Any]:
    route = op.route
    operation_id = _unique_id(f"{route.protocol}_{route.method}_{op.path}", used_ids)
    out: dict[str, Any] = {
        "tags": [_TAGS[route.protocol]],
        "summary": route.summary,
        "operationId": operation_id,
    }
    served = op.served
    if served is not None:
        version = f" version {served.version}" if served.version is not None else ""
        which = "the default version" if route.scope == "api" else "this version"
        out["description"] = (
            f"API `{served.name}`{version} ({served.api.runtime}); unversioned routes "
            f"use {which}. {_signature_text(served.signature)}"
        )
    params = _parameters(op)
    if params:
        out["parameters"] = params
    if route.body is not None and served is not None:
        out["requestBody"] = _request_body(route.body, served)
    out["responses"] = _responses(op)
    return out


def _unique_id(raw: str, used: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9]+", "_", raw).strip("_") or "root"
    candidate, n = base, 2
    while candidate in used:
        candidate, n = f"{base}_{n}", n + 1
    used.add(candidate)
    return candidate


def _base_url(request: Request) -> str:
    host = request.headers.get("host", "")
    if not re.fullmatch(r"[A-Za-z0-9.\-]+(:\d{1,5})?|\[[0-9A-Fa-f:.]+\](:\d{1,5})?", host):
        return ""
    return f"http://{host}"
