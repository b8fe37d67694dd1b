"""The management port's route table and its OpenAPI 3.0 description.

One table, `ROUTES`, says every (method, path) the management port serves, its
summary and query parameters. `management.py` builds the Starlette app's routes
from it and `management_document()` (served at `OPTIONS /` and
`GET /api-description`) describes the same table, so the app and its document
cannot drift apart. Kept apart from `management.py` because it is pure data and
document-building: no handlers, no registry, no Starlette.
"""

from __future__ import annotations

import re
from typing import Any

# (method, path, summary, query parameters): the app's routes and the document come from it.
ROUTES: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("options", "/", "This OpenAPI document", ()),
    ("get", "/api-description", "This OpenAPI document", ()),
    ("get", "/models", "List models", ("limit", "next_page_token")),
    (
        "post",
        "/models",
        "Register a model from the model store (needs --enable-model-api)",
        ("url", "model_name", "initial_workers", "synchronous", "batch_size", "max_batch_delay"),
    ),
    ("get", "/models/{model}", "Describe the default version", ()),
    (
        "put",
        "/models/{model}",
        "Scale the default version",
        ("min_worker", "max_worker", "synchronous"),
    ),
    ("delete", "/models/{model}", "Unregister the default version (needs --enable-model-api)", ()),
    ("get", "/models/{model}/all", "Describe every version", ()),
    ("get", "/models/{model}/{version}", "Describe one version", ()),
    (
        "put",
        "/models/{model}/{version}",
        "Scale one version",
        ("min_worker", "max_worker", "synchronous"),
    ),
    (
        "delete",
        "/models/{model}/{version}",
        "Unregister one version (needs --enable-model-api)",
        (),
    ),
    ("put", "/models/{model}/{version}/set-default", "Make this version the default", ()),
)


TORCHSERVE_TAG = "TorchServe management API"


_COUNT = {"type": "integer"}
_MS = {"type": "number", "nullable": True}
_TIMESERIES = {
    "type": "object",
    "description": "One point per minute of the window, oldest first; missing minutes have "
    "zero counts and null latency, replicas and queue",
    "properties": {
        "api": {"type": "string"},
        "window": {"type": "string"},
        "step_s": {"type": "integer", "enum": [60]},
        "points": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "t": {"type": "integer", "description": "the minute's start, epoch seconds"},
                    "2xx": _COUNT,
                    "4xx": _COUNT,
                    "5xx": _COUNT,
                    "p50_ms": _MS,
                    "p90_ms": _MS,
                    "p99_ms": _MS,
                    "replicas": {"type": "integer", "nullable": True},
                    "queue": {"type": "integer", "nullable": True},
                },
            },
        },
    },
}
_BY_STATUS = {
    "type": "object",
    "additionalProperties": _COUNT,
    "description": "calls by status class",
}
_LIMIT = {"type": "integer", "nullable": True, "description": "null: no bound"}
_USAGE = {
    "type": "object",
    "description": "Metered calls of a calendar month (UTC): yours, or the admin's view of "
    "everyone (or of ?user=). `keys` and `plan` are counted now, for this month",
    "properties": {
        "month": {"type": "string", "example": "2026-12"},
        "total": _COUNT,
        "usage": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "user": {"type": "string"},
                    "key_id": {"type": "string"},
                    "api": {"type": "string"},
                    "version": {"type": "string", "nullable": True},
                    "by_status": _BY_STATUS,
                    "calls": _COUNT,
                },
            },
        },
        "days": {
            "type": "array",
            "description": "calls per UTC day of the month, days with calls only",
            "items": {
                "type": "object",
                "properties": {
                    "date": {"type": "string", "example": "2026-12-05"},
                    "by_status": _BY_STATUS,
                    "calls": _COUNT,
                },
            },
        },
        "keys": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "key_id": {"type": "string"},
                    "user": {"type": "string"},
                    "name": {"type": "string"},
                    "status": {"type": "string"},
                    "calls_this_month": _COUNT,
                    "quota": _LIMIT,
                    "quota_left": {
                        **_LIMIT,
                        "description": "the smaller of the key's quota and its user's plan's "
                        "calls left; null: no bound",
                    },
                    "rate": {"type": "number", "nullable": True},
                    "burst": _LIMIT,
                    "refused_429": {
                        **_COUNT,
                        "description": "calls refused by a quota or rate limit this month "
                        "(since the server started; never metered)",
                    },
                },
            },
        },
        "plan": {
            "type": "object",
            "nullable": True,
            "description": "the user's plan; null for the admin's view of everyone",
            "properties": {
                "user": {"type": "string"},
                "name": {"type": "string"},
                "apis": _LIMIT,
                "calls_per_month": _LIMIT,
                "calls_this_month": _COUNT,
                "calls_left": _LIMIT,
                "max_replicas": _LIMIT,
                "max_replica_mem": _LIMIT,
                "max_upload_bytes": _LIMIT,
                "max_unpacked_bytes": _LIMIT,
                "network_egress": {"type": "boolean"},
            },
        },
    },
}
# (method, path) -> (the 200 answer's schema, {query parameter: allowed values})
RESPONSE_SCHEMAS: dict[tuple[str, str], tuple[dict[str, Any], dict[str, list[str]]]] = {
    ("get", "/apis/{name}/timeseries"): (_TIMESERIES, {"window": ["15m", "1h", "24h"]}),
    ("get", "/usage"): (_USAGE, {}),
}


def management_document(
    extra: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (), extra_tag: str = "Kiln"
) -> dict[str, Any]:
    """The OpenAPI document of `ROUTES`, plus `extra` (the control plane's) under `extra_tag`."""
    import kiln

    paths: dict[str, Any] = {}
    tagged = [(r, TORCHSERVE_TAG) for r in ROUTES] + [(r, extra_tag) for r in extra]
    for (method, path, summary, query), tag in tagged:
        params = [
            {"name": n, "in": "path", "required": True, "schema": {"type": "string"}}
            for n in re.findall(r"\{(\w+)\}", path)
        ]
        params += [
            {"name": n, "in": "query", "required": n == "url", "schema": {"type": "string"}}
            for n in query
        ]
        operation: dict[str, Any] = {
            "summary": summary,
            "tags": [tag],
            "operationId": f"{method}_{path}".replace("/", "_").replace("{", "").replace("}", ""),
            "responses": {
                "200": {"description": "Success", "content": {"application/json": {"schema": {}}}},
                "default": {
                    "description": "Error",
                    "content": {
                        "application/json": {
                            "schema": {"$ref": "#/components/schemas/TorchServeError"}
                        }
                    },
                },
            },
        }
        if (method, path) in RESPONSE_SCHEMAS:
            schema, enums = RESPONSE_SCHEMAS[(method, path)]
            operation["responses"]["200"]["content"]["application/json"]["schema"] = schema
            for param in params:
                if param["name"] in enums:
                    param["schema"] = {"type": "string", "enum": enums[param["name"]]}
        if params:
            operation["parameters"] = params
        paths.setdefault(path, {})[method] = operation
    return {
        "openapi": "3.0.1",
        "info": {
            "title": "Kiln management API",
            "version": kiln.__version__,
            "description": (
                "The management port: Kiln's control plane (deployments, APIs, logs), "
                "which the kiln CLI uses, and TorchServe's management API."
            ),
        },
        "tags": [{"name": extra_tag}, {"name": TORCHSERVE_TAG}]
        if extra
        else [{"name": TORCHSERVE_TAG}],
        "paths": paths,
        "components": {
            "schemas": {
                "TorchServeError": {
                    "type": "object",
                    "properties": {
                        "code": {"type": "integer"},
                        "type": {"type": "string"},
                        "message": {"type": "string"},
                    },
                }
            }
        },
    }
