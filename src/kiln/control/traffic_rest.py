"""Traffic splits on the management port (what `kiln traffic` calls).

| route | what |
| --- | --- |
| `GET /apis/{name}/traffic` | the split in force, its source, shadow and sticky header |
| `PUT /apis/{name}/traffic` | body `{"1": 50, "2": 50}`: a runtime split, without a redeploy |
| `DELETE /apis/{name}/traffic` | forget the runtime split: kiln.yaml's applies again |

A runtime split is kept in the state store (`api_traffic`), so it survives
restarts and redeploys that keep its versions; the registry loads it when the
API is routed (serving/router.py). Changing a split needs the `manage` scope (the
port's gate) and owning the API.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from kiln.errors import Forbidden, InvalidInput, NotFound
from kiln.serving.traffic import check_weights

TRAFFIC_ROUTES: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("get", "/apis/{name}/traffic", "An API's traffic split between its versions", ()),
    (
        "put",
        "/apis/{name}/traffic",
        'Set an API\'s traffic split without a redeploy (body: {"1": 90, "2": 10})',
        (),
    ),
    ("delete", "/apis/{name}/traffic", "Forget the runtime split: kiln.yaml's applies", ()),
)

# The PUT body, for the OpenAPI document (rest.py adds it to the operation).
PUT_BODY: dict[str, Any] = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "description": "version -> weight (whole numbers >= 0, any positive total; "
                "a version's share is its weight divided by the total)",
                "additionalProperties": {"type": "integer", "minimum": 0},
            },
            "example": {"1": 90, "2": 10},
        }
    },
}


def traffic_routes(server: Any, api_name: Callable[[Request], str]) -> list[Route]:
    """The routes; `api_name` is rest.py's (the caller's name for the API in the path)."""
    api = TrafficRoutes(server, api_name)
    handlers = {"get": api.get, "put": api.put, "delete": api.delete}
    return [
        Route(path, handlers[method], methods=[method.upper()])
        for method, path, _, _ in TRAFFIC_ROUTES
    ]


def traffic_view(group: Any) -> dict[str, Any]:
    """What GET/PUT answer and `kiln traffic` prints."""
    versions = sorted(str(v) for v in group.versions if v is not None)
    return {
        "api": group.name,
        "versions": versions,
        "default": group.default_version,
        "traffic": group.traffic(),
    }


class TrafficRoutes:
    def __init__(self, server: Any, api_name: Callable[[Request], str]) -> None:
        self.server = server
        self.api_name = api_name

    def _group(self, request: Request, change: bool) -> Any:
        name = self.api_name(request)  # an API the caller may not see is a 404
        principal = request.scope.get("state", {}).get("principal")
        group = self.server.registry.view(principal).groups.get(name)
        if group is None:
            raise NotFound(f"no API named '{name}'; `kiln get` lists the APIs")
        if change and principal is not None and not principal.owns(name):
            raise Forbidden(f"only the owner of API '{name}' may change its traffic split")
        return group

    async def get(self, request: Request) -> Response:
        return JSONResponse(traffic_view(self._group(request, change=False)))

    async def put(self, request: Request) -> Response:
        group = self._group(request, change=True)
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError:
            raise InvalidInput(
                'the body must be JSON mapping versions to weights, e.g. {"1": 90, "2": 10}'
            ) from None
        weights = parse_weights(group, body)
        group.set_traffic(weights)
        await asyncio.to_thread(self.server.store.set_traffic, group.name, weights)
        self.server.log.write(
            group.name, {"event": "traffic", "message": f"traffic split set to {weights}"}
        )
        return JSONResponse(traffic_view(group))

    async def delete(self, request: Request) -> Response:
        group = self._group(request, change=True)
        group.set_traffic(None)
        await asyncio.to_thread(self.server.store.set_traffic, group.name, None)
        self.server.log.write(
            group.name, {"event": "traffic", "message": "runtime split removed: kiln.yaml's"}
        )
        return JSONResponse(traffic_view(group))


def parse_weights(group: Any, body: Any) -> dict[str, int]:
    """A PUT body as version -> weight, every version one the API serves; 400 otherwise."""
    if not isinstance(body, dict):
        raise InvalidInput('the body must map versions to weights, e.g. {"1": 90, "2": 10}')
    weights = {str(k): v for k, v in body.items()}
    problem = check_weights(weights)
    if problem is not None:
        raise InvalidInput(f'{problem}; e.g. {{"1": 90, "2": 10}}')
    served = sorted(str(v) for v in group.versions if v is not None)
    unknown = sorted(v for v in weights if v not in served)
    if unknown:
        raise InvalidInput(
            f"API '{group.name}' has no version {', '.join(unknown)} "
            f"(versions: {', '.join(served) or 'none: it is not versioned'})"
        )
    return weights
