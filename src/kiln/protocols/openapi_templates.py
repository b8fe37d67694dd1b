"""TorchServe's templated paths in the inference port's OpenAPI document.

TorchServe's own description (`OPTIONS /`, its inference_open_api.json) lists
each route once, with the model as a path parameter: `/predictions/{model_name}`,
`/predictions/{model_name}/{model_version}`, `/v1/models/{model_name}:predict`
and so on. Clients generated from it (swagger-codegen, openapi-generator) call
operations on those templates, so Kiln lists them too, next to the concrete
per-model paths that `openapi.py` expands from the registry (which carry each
model's real input schema). A template is listed only while an adapter of the
inference port claims it, probed the same way as the concrete paths.

This module only describes the templates; `openapi.py` probes and assembles.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_BINARY = {"type": "string", "format": "binary"}


@dataclass(frozen=True)
class Template:
    """One templated operation: TorchServe's path and name for it, in Kiln's tags."""

    tag: str
    method: str
    path: str
    operation_id: str
    description: str
    errors: str  # which error schema the route answers with (openapi_schemas._COMPONENTS)
    body: str  # "raw" (any bytes, TorchServe's), "v1" or "v2"
    explains: bool = False


TEMPLATES: tuple[Template, ...] = (
    Template(
        "TorchServe",
        "post",
        "/predictions/{model_name}",
        "predictions",
        "Predictions entry point to get inference using default model version.",
        "TorchServeError",
        "raw",
    ),
    Template(
        "TorchServe",
        "post",
        "/predictions/{model_name}/{model_version}",
        "version_predictions",
        "Predictions entry point to get inference using specific model version.",
        "TorchServeError",
        "raw",
    ),
    Template(
        "TorchServe",
        "post",
        "/explanations/{model_name}",
        "explanations",
        "Explanations entry point using the default model version: the attributions as "
        "nested lists shaped like the input (?format=kiln: Kiln's explanation object).",
        "TorchServeError",
        "raw",
        explains=True,
    ),
    Template(
        "TorchServe",
        "post",
        "/explanations/{model_name}/{model_version}",
        "version_explanations",
        "Explanations entry point using a specific model version.",
        "TorchServeError",
        "raw",
        explains=True,
    ),
    Template(
        "KServe V1",
        "post",
        "/v1/models/{model_name}:predict",
        "kserve_v1_predictions",
        "KServe V1 predictions using the default model version.",
        "KServeError",
        "v1",
    ),
    Template(
        "KServe V1",
        "post",
        "/v1/models/{model_name}:explain",
        "kserve_v1_explanations",
        "KServe V1 explanations: one attribution list per instance.",
        "KServeError",
        "v1",
        explains=True,
    ),
    Template(
        "Open Inference Protocol (V2)",
        "post",
        "/v2/models/{model_name}/infer",
        "kserve_v2_infer",
        "Open Inference Protocol (KServe V2) inference using the default model version.",
        "KServeError",
        "v2",
    ),
)


def probe_path(template: Template) -> str:
    """A concrete path of this shape, for asking the adapters whether they serve it."""
    return template.path.replace("{model_name}", "model").replace("{model_version}", "1")


def templated_paths(
    is_served: Callable[[str, str], bool], models: list[str]
) -> dict[str, dict[str, Any]]:
    """The templates an adapter serves now (path -> method -> operation); `is_served`
    answers for a method and a concrete path, `models` are the names served."""
    paths: dict[str, dict[str, Any]] = {}
    for template in TEMPLATES:
        if is_served(template.method.upper(), probe_path(template)):
            item = paths.setdefault(template.path, {})
            item[template.method] = template_operation(template, models)
    return paths


def template_operation(template: Template, models: list[str]) -> dict[str, Any]:
    """The OpenAPI operation of one template; `models` are the names served right now."""
    served = ", ".join(models) or "none yet"
    params: list[dict[str, Any]] = [
        _path_param("model_name", f"Name of model (served here: {served}).")
    ]
    if "{model_version}" in template.path:
        params.append(_path_param("model_version", "Name of model version."))
    if template.explains:
        params.append(
            {
                "in": "query",
                "name": "format",
                "description": "Leave out for attribution lists; kiln for Kiln's object.",
                "required": False,
                "schema": {"type": "string", "enum": ["torchserve", "kiln"]},
            }
        )
    error = {"$ref": f"#/components/schemas/{template.errors}"}
    codes = {
        "400": "The input cannot be read by this model",
        "404": "Model not found or Model Version not found",
        "500": "Internal Server Error",
        "503": "No worker is available to serve request",
    }
    if template.explains:
        codes["501"] = "The model has no explainer"
    responses: dict[str, Any] = {
        "200": {
            "description": "Output data format is defined by each model.",
            "content": {"*/*": {"schema": _BINARY}},
        }
    }
    for code, text in codes.items():
        responses[code] = {
            "description": text,
            "content": {"application/json": {"schema": error}},
        }
    return {
        "tags": [template.tag],
        "summary": template.description.split(":")[0].rstrip("."),
        "description": template.description,
        "operationId": template.operation_id,
        "parameters": params,
        "requestBody": _body(template.body),
        "responses": responses,
    }


def _path_param(name: str, description: str) -> dict[str, Any]:
    return {
        "in": "path",
        "name": name,
        "description": description,
        "required": True,
        "schema": {"type": "string"},
    }


def _body(kind: str) -> dict[str, Any]:
    if kind == "v1":
        schema: dict[str, Any] = {
            "type": "object",
            "properties": {
                "instances": {"type": "array", "items": {}},
                "inputs": {},
            },
        }
        return {"required": True, "content": {"application/json": {"schema": schema}}}
    if kind == "v2":
        schema = {
            "type": "object",
            "required": ["inputs"],
            "properties": {"inputs": {"type": "array", "items": {"type": "object"}}},
        }
        return {"required": True, "content": {"application/json": {"schema": schema}}}
    return {
        "description": "Input data format is defined by each model.",
        "required": True,
        "content": {"*/*": {"schema": _BINARY}},
    }
