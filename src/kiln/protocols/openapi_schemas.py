"""Request and response schemas for the inference port's OpenAPI document.

Split out of `openapi.py`, which decides *which* operations the document lists
(the route table, probing the live adapters, expanding per API and version).
This module decides what each operation's parameters, bodies and responses
*look like*: JSON schemas and examples derived from a version's real tensor
signature (input names, V2 datatypes, shapes), per protocol body family
(native / TorchServe JSON, KServe V1 `instances`, Open Inference Protocol V2),
plus the three error shapes. It knows nothing about routing: it reads an operation
through the `Operation` protocol below (which `openapi.py`'s dataclasses satisfy),
so it never imports `openapi.py`, which imports it.
"""

from __future__ import annotations

from typing import Any, Protocol

from kiln.serving.router import ApiGroup, ServedApi


class Route(Protocol):
    """What a schema needs of a route shape (openapi.RouteSpec)."""

    @property
    def protocol(self) -> str: ...
    @property
    def method(self) -> str: ...
    @property
    def template(self) -> str: ...
    @property
    def body(self) -> str | None: ...
    @property
    def errors(self) -> str: ...


class Operation(Protocol):
    """What a schema needs of one operation of the document (openapi.Operation)."""

    @property
    def route(self) -> Route: ...
    @property
    def path(self) -> str: ...
    @property
    def group(self) -> ApiGroup | None: ...
    @property
    def served(self) -> ServedApi | None: ...


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
