"""The inference port described as OpenAPI 3.0, generated from what is actually served.

`OPTIONS /` and `GET /api-description` (TorchServe's names) and `GET /openapi.json`
return the document; `GET /docs` renders it as one self-contained HTML page
(no scripts, nothing fetched from elsewhere).

Nothing here is written per API. `ROUTES` is the table of every route shape the
inference port knows; the document expands each shape for every API and version
in the registry (`/predictions/{model}` becomes `/predictions/iris`) and keeps
only the paths one of the live adapters actually claims, so a protocol that is
switched off, or a route an adapter does not serve, never appears. Request
schemas and examples come from each version's real signature (input names,
V2 datatypes, shapes).
"""

from __future__ import annotations

import html
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson

import kiln
from kiln.errors import KilnError, MethodNotAllowed
from kiln.protocols.errors import native_error
from kiln.protocols.http import Request, Send, send_bytes, send_json
from kiln.serving.router import ApiGroup, Registry, ServedApi

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

    def __init__(self, registry: Registry, log: Any) -> None:
        self.registry = registry
        self.log = log
        self._probes: list[Any] | None = None

    def route(self, request: Request) -> tuple[Any, str] | None:
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

    async def _serve_document(self, request: Request, send: Send) -> int:
        path = request.path.rstrip("/") or "/"
        allowed = ("OPTIONS",) if path == "/" else ("GET", "HEAD")
        if request.method not in allowed:
            err = MethodNotAllowed(f"{request.method} is not allowed on {path}; use GET")
            err.allow = allowed  # type: ignore[attr-defined]
            raise err
        document = self.document(_base_url(request))
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
        if self._probes is None:
            from kiln.protocols.app import default_adapters

            self._probes = [
                a
                for a in default_adapters(self.registry, self.log)
                if not isinstance(a, OpenApiRoutes)
            ]
        return self._probes

    def is_served(self, method: str, path: str) -> bool:
        """True when an adapter claims `method path` (its handler may still answer 4xx)."""
        request = probe_request(method, path)
        for adapter in self.probes():
            try:
                if adapter.route(request) is not None:
                    return True
            except KilnError:
                return True  # claimed, and refused in that protocol's own shape
        return False

    def operations(self) -> list[Operation]:
        """Every concrete operation the inference port serves right now."""
        found = []
        for op in expand(self.registry):
            if op.route.always or self.is_served(op.route.method.upper(), op.path):
                found.append(op)
        return found

    def document(self, base_url: str = "") -> dict[str, Any]:
        return build_document(self.operations(), base_url)


def probe_request(method: str, path: str) -> Request:
    """A bodiless request for asking an adapter's `route()` whether it owns `path`."""

    async def receive() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    scope = {"type": "http", "method": method, "path": path, "headers": [], "query_string": b""}
    return Request(scope, receive)


def expand(registry: Registry) -> Iterator[Operation]:
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
def build_document(operations: list[Operation], base_url: str = "") -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    used_ids: set[str] = set()
    for op in operations:
        item = paths.setdefault(op.path, {})
        item[op.route.method] = _operation(op, used_ids)
    document: dict[str, Any] = {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "Kiln APIs",
            "version": kiln.__version__,
            "description": (
                "Every route this Kiln server answers on its inference port: the native "
                "API at each endpoint, the TorchServe inference API, KServe V1 and the Open "
                "Inference Protocol (V2). Generated from the running server."
            ),
        },
        "tags": [{"name": name} for name in _TAGS.values()],
        "paths": paths,
        "components": {"schemas": _COMPONENTS},
    }
    if base_url:
        document["servers"] = [{"url": base_url}]
    return document


_COMPONENTS: dict[str, Any] = {
    "NativeError": {
        "type": "object",
        "required": ["error", "request_id"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["type", "message"],
                "properties": {"type": {"type": "string"}, "message": {"type": "string"}},
            },
            "request_id": {"type": "string"},
        },
    },
    "TorchServeError": {
        "type": "object",
        "required": ["code", "type", "message"],
        "properties": {
            "code": {"type": "integer"},
            "type": {"type": "string"},
            "message": {"type": "string"},
        },
    },
    "KServeError": {
        "type": "object",
        "required": ["error"],
        "properties": {"error": {"type": "string"}},
    },
}
_ERROR_SCHEMA = {"native": "NativeError", "torchserve": "TorchServeError", "kserve": "KServeError"}
_ERROR_TEXT = {
    "400": "The request does not fit the model",
    "404": "No such model or version",
    "405": "Method not allowed on this path",
    "413": "The body is over the API's max_request_bytes",
    "500": "The model or its handler failed",
    "501": "The API does not offer this operation",
    "503": "The model is loading, restarting or overloaded; retry after Retry-After seconds",
    "504": "The model did not answer in time",
}


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


def _parameters(op: Operation) -> list[dict[str, Any]]:
    if op.route.protocol != "native" or op.group is None:
        return []
    params = []
    versions = sorted(str(v) for v in op.group.versions if v is not None)
    if versions:
        params.append(
            {
                "name": "version",
                "in": "query",
                "required": False,
                "description": f"Which version answers; default {op.group.default_version}",
                "schema": {"type": "string", "enum": versions},
            }
        )
    if op.route.method == "post":
        params.append(
            {
                "name": "debug",
                "in": "query",
                "required": False,
                "description": "Log each stage of the request (pre_inference, model, ...)",
                "schema": {"type": "boolean"},
            }
        )
    return params


def _responses(op: Operation) -> dict[str, Any]:
    route = op.route
    if route.template == "/docs":
        ok: dict[str, Any] = {"text/html": {"schema": {"type": "string"}}}
    elif route.body in ("native", "torchserve"):
        ok = {
            "application/json": {"schema": {}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        }
    else:
        ok = {"application/json": {"schema": _ok_schema(op)}}
    responses: dict[str, Any] = {"200": {"description": "Success", "content": ok}}
    codes = ["404", "405"]
    if route.body is not None:
        codes = ["400", "404", "413", "500", "503", "504"]
        if "explain" in route.template:
            codes.append("501")
    elif op.served is not None:
        codes.append("503")
    error = {"$ref": f"#/components/schemas/{_ERROR_SCHEMA[route.errors]}"}
    for code in sorted(codes):
        responses[code] = {
            "description": _ERROR_TEXT[code],
            "content": {"application/json": {"schema": error}},
        }
    return responses


def _ok_schema(op: Operation) -> dict[str, Any]:
    if op.route.body == "v2" and op.served is not None:
        outputs = [o.get("name") for o in op.served.signature.get("outputs", []) if o.get("name")]
        name_schema: dict[str, Any] = {"type": "string"}
        if outputs:
            name_schema["enum"] = outputs
        return {
            "type": "object",
            "properties": {
                "model_name": {"type": "string"},
                "model_version": {"type": "string"},
                "id": {"type": "string"},
                "outputs": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "name": name_schema,
                            "datatype": {"type": "string"},
                            "shape": {"type": "array", "items": {"type": "integer"}},
                            "data": {"type": "array", "items": {}},
                        },
                    },
                },
            },
        }
    if op.route.body == "v1":
        key = "explanations" if op.path.endswith(":explain") else "predictions"
        return {"type": "object", "properties": {key: {"type": "array", "items": {}}}}
    return {}


# ----- schemas from signatures --------------------------------------------------------
_LEAF = {"BOOL": {"type": "boolean"}, "BYTES": {"type": "string"}}
_EXAMPLE_LEAF: dict[str, Any] = {"BOOL": False, "BYTES": "text"}


def _leaf(datatype: str | None) -> dict[str, Any]:
    datatype = (datatype or "").upper()
    if datatype in _LEAF:
        return dict(_LEAF[datatype])
    if datatype.startswith(("INT", "UINT")):
        return {"type": "integer"}
    if datatype.startswith(("FP", "BF")):
        return {"type": "number"}
    return {}


def _example_leaf(datatype: str | None) -> Any:
    datatype = (datatype or "").upper()
    if datatype in _EXAMPLE_LEAF:
        return _EXAMPLE_LEAF[datatype]
    if datatype.startswith(("INT", "UINT")):
        return 0
    return 0.0


def _dims(shape: Any) -> list[int]:
    return [int(d) if isinstance(d, int) else -1 for d in shape] if isinstance(shape, list) else []


def tensor_schema(spec: dict[str, Any], drop_batch: bool = False) -> dict[str, Any]:
    """Nested JSON arrays for one tensor: one array level per dimension."""
    dims = _dims(spec.get("shape"))
    if drop_batch and dims:
        dims = dims[1:]
    schema = _leaf(spec.get("datatype"))
    for size in reversed(dims):
        level: dict[str, Any] = {"type": "array", "items": schema}
        if size > 0:
            level["minItems"] = level["maxItems"] = size
        schema = level
    schema["description"] = (
        f"`{spec.get('name')}`: {spec.get('datatype') or 'any'} tensor, "
        f"shape {_shape_text(spec.get('shape'))}"
    )
    return schema


def tensor_example(spec: dict[str, Any], drop_batch: bool = False) -> Any:
    dims = _dims(spec.get("shape"))
    if drop_batch and dims:
        dims = dims[1:]
    value = _example_leaf(spec.get("datatype"))
    for size in reversed(dims):
        value = [value] * (size if size > 0 else 1)
    return value


def _shape_text(shape: Any) -> str:
    if not isinstance(shape, list):
        return "unknown"
    return "[" + ", ".join("N" if d == -1 else str(d) for d in shape) + "]"


def _signature_text(signature: dict[str, Any]) -> str:
    inputs = signature.get("inputs") or []
    if not inputs:
        return "The API declares no input signature: the body is whatever its handler reads."
    described = ", ".join(
        f"`{i.get('name')}` ({i.get('datatype')}, shape {_shape_text(i.get('shape'))})"
        for i in inputs
    )
    return f"Inputs: {described}; N is any size."


def _inputs(served: ServedApi) -> list[dict[str, Any]]:
    if served.worker_spec.request_handler:
        return []  # pre_inference decides what the body looks like
    return [i for i in served.signature.get("inputs") or [] if i.get("name")]


def json_body(served: ServedApi) -> tuple[dict[str, Any], Any]:
    """(schema, example) of the JSON body on the native and TorchServe routes."""
    inputs = _inputs(served)
    if not inputs:
        hook = served.worker_spec.request_handler
        why = "its pre_inference hook" if hook else "its handler"
        return {"description": f"Any JSON: the API's {why} reads it"}, {}
    schema = {
        "type": "object",
        "required": [i["name"] for i in inputs],
        "properties": {i["name"]: tensor_schema(i) for i in inputs},
        "description": "Each input by name as nested arrays"
        + ("; a single-input API also takes the bare array" if len(inputs) == 1 else ""),
    }
    return schema, {i["name"]: tensor_example(i) for i in inputs}


def v1_body(served: ServedApi) -> tuple[dict[str, Any], Any]:
    inputs = _inputs(served)
    if len(inputs) == 1:
        row = tensor_schema(inputs[0], drop_batch=True)
        example_row = tensor_example(inputs[0], drop_batch=True)
    elif inputs:
        row = {
            "type": "object",
            "properties": {i["name"]: tensor_schema(i, drop_batch=True) for i in inputs},
        }
        example_row = {i["name"]: tensor_example(i, drop_batch=True) for i in inputs}
    else:
        row, example_row = {}, {}
    schema = {
        "type": "object",
        "required": ["instances"],
        "properties": {"instances": {"type": "array", "items": row, "description": "One per row"}},
    }
    return schema, {"instances": [example_row]}


def v2_body(served: ServedApi) -> tuple[dict[str, Any], Any]:
    inputs = [i for i in served.signature.get("inputs") or [] if i.get("name")]
    name_schema: dict[str, Any] = {"type": "string"}
    if inputs:
        name_schema["enum"] = [i["name"] for i in inputs]
    schema = {
        "type": "object",
        "required": ["inputs"],
        "properties": {
            "id": {"type": "string"},
            "parameters": {"type": "object", "additionalProperties": True},
            "inputs": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["name", "datatype", "shape", "data"],
                    "properties": {
                        "name": name_schema,
                        "datatype": {"type": "string"},
                        "shape": {"type": "array", "items": {"type": "integer"}},
                        "data": {"type": "array", "items": {}},
                        "parameters": {"type": "object", "additionalProperties": True},
                    },
                },
                "description": _signature_text(served.signature),
            },
            "outputs": {
                "type": "array",
                "items": {"type": "object", "properties": {"name": {"type": "string"}}},
            },
        },
    }
    example_inputs = []
    for spec in inputs:
        shape = [d if d > 0 else 1 for d in _dims(spec.get("shape"))]
        count = 1
        for d in shape:
            count *= d
        example_inputs.append(
            {
                "name": spec["name"],
                "datatype": spec.get("datatype") or "FP32",
                "shape": shape,
                "data": [_example_leaf(spec.get("datatype"))] * count,
            }
        )
    return schema, {"inputs": example_inputs}


def _request_body(kind: str, served: ServedApi) -> dict[str, Any]:
    if kind == "v2":
        schema, example = v2_body(served)
    elif kind == "v1":
        schema, example = v1_body(served)
    else:
        schema, example = json_body(served)
    content: dict[str, Any] = {"application/json": {"schema": schema, "example": example}}
    if kind == "torchserve":
        content["application/octet-stream"] = {
            "schema": {"type": "string", "format": "binary", "description": "Raw bytes (curl -T)"}
        }
        content["multipart/form-data"] = {
            "schema": {
                "type": "object",
                "properties": {"data": {"type": "string", "format": "binary"}},
                "description": "Form fields (curl -F data=@file); repeated fields are all passed",
            }
        }
    return {"required": True, "content": content}


def _base_url(request: Request) -> str:
    host = request.headers.get("host", "")
    if not re.fullmatch(r"[A-Za-z0-9.\-]+(:\d{1,5})?|\[[0-9A-Fa-f:.]+\](:\d{1,5})?", host):
        return ""
    return f"http://{host}"


# ----- the docs page ------------------------------------------------------------------
_STYLE = """
body{font:15px/1.45 system-ui,sans-serif;margin:2rem auto;max-width:70rem;padding:0 1rem;color:#222}
h2{border-bottom:1px solid #ddd;padding-bottom:.2rem;margin-top:2rem}
.op{border:1px solid #ddd;border-radius:6px;margin:.8rem 0;padding:.6rem .9rem}
.m{display:inline-block;min-width:4.5rem;font-weight:700;text-transform:uppercase}
.get{color:#0a6}.post{color:#06c}.options{color:#a60}
code,pre{font:13px/1.35 ui-monospace,monospace}
pre{background:#f6f6f6;padding:.5rem;overflow:auto;border-radius:4px}
details summary{cursor:pointer;color:#555}
"""


def render_docs(document: dict[str, Any]) -> str:
    """The document as a plain HTML page: every path, its method, schema and a curl line."""
    base = (document.get("servers") or [{"url": "http://127.0.0.1:8080"}])[0]["url"]
    by_tag: dict[str, list[str]] = {name: [] for name in _TAGS.values()}
    for path, item in document["paths"].items():
        for method, op in item.items():
            by_tag.setdefault(op["tags"][0], []).append(_render_op(base, path, method, op))
    esc = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{esc(document['info']['title'])}</title><style>{_STYLE}</style></head><body>",
        f"<h1>{esc(document['info']['title'])} <small>{esc(document['info']['version'])}</small>",
        f"</h1><p>{esc(document['info']['description'])}</p>",
        "<p>Machine-readable: <a href='/openapi.json'>/openapi.json</a> "
        "(also <code>OPTIONS /</code> and <code>GET /api-description</code>).</p>",
    ]
    for tag, ops in by_tag.items():
        if ops:
            parts.append(f"<h2>{esc(tag)}</h2>")
            parts.extend(ops)
    parts.append("</body></html>")
    return "".join(parts)


def _render_op(base: str, path: str, method: str, op: dict[str, Any]) -> str:
    esc = html.escape
    out = [
        f"<div class='op'><span class='m {esc(method)}'>{esc(method)}</span>",
        f"<code>{esc(path)}</code> &mdash; {esc(op.get('summary', ''))}",
    ]
    if op.get("description"):
        out.append(f"<p>{esc(op['description'])}</p>")
    curl = ["curl"]
    if method != "get":
        curl += ["-X", method.upper()]
    curl.append(base + path)
    body = op.get("requestBody", {}).get("content", {}).get("application/json")
    if body is not None:
        curl += ["-H", "Content-Type: application/json"]
        curl += ["-d", orjson.dumps(body.get("example", {})).decode()]
        schema = orjson.dumps(body["schema"], option=orjson.OPT_INDENT_2).decode()
        out.append(f"<details><summary>request schema</summary><pre>{esc(schema)}</pre></details>")
    out.append(f"<pre>{esc(' '.join(shlex.quote(c) for c in curl))}</pre></div>")
    return "".join(out)
