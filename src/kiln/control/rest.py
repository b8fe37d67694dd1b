"""The control plane's REST API on the management port: what the CLI talks to.

| route | what |
| --- | --- |
| `GET /server` | version, mode, backend, uptime, URLs of the three ports |
| `POST /deployments?name=` | upload a project (gzip'd tar from `kiln deploy`), roll it out |
| `GET /deployments`, `GET /deployments/{name}` | deployments, their revisions and rollout |
| `DELETE /deployments/{name}` | delete every API of a deployment |
| `GET /apis`, `GET /apis/{name}?window=1h` | APIs with status, replicas, traffic; one in detail |
| `DELETE /apis/{name}` | stop serving the API and forget it |
| `POST /apis/{name}/refresh` | restart its replicas without downtime |
| `POST /apis/{name}/rollback?revision=` | roll its deployment back |
| `GET /apis/{name}/logs?follow=&tail=` | its merged replica logs, JSON lines |
| `GET /apis/{name}/timeseries?window=15m, 1h or 24h` | per-minute history (timeseries.py) |
| `GET, PUT, DELETE /apis/{name}/traffic` | the traffic split between versions (traffic_rest.py) |
| `GET /docs`, `GET /openapi.json` | the management port's OpenAPI document |
| `/apis/{name}/jobs...` | batch jobs: submit, list, status, stop, failed, logs (jobs_rest.py) |

The handlers are thin: the work is in `deployments.py` (lifecycle) and
`status.py` (what `kiln get` shows). Errors use the management port's
TorchServe shape `{"code", "type", "message"}`, plus `issues` for a config that
was rejected.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from kiln.control.deployments import ConfigRejected
from kiln.control.log_tail import tail_lines
from kiln.control.packaging import MAX_ARCHIVE_BYTES
from kiln.errors import InvalidInput, NotFound, PayloadTooLarge, UnsupportedMediaType

TAG = "Kiln control plane"
UPLOAD_WRITE_BYTES = 1 << 20  # an upload is written to its file in pieces of about this

# (method, path, summary, query parameters): the routes and their OpenAPI entries.
CONTROL_ROUTES: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("get", "/server", "The server: version, mode, backend, uptime and the URLs of its ports", ()),
    ("post", "/deployments", "Deploy a project (body: gzip'd tar from kiln deploy)", ("name",)),
    ("get", "/deployments", "List deployments", ()),
    ("get", "/deployments/{name}", "A deployment: revisions and its latest rollout", ()),
    ("delete", "/deployments/{name}", "Delete a deployment and all its APIs", ()),
    ("get", "/apis", "Every API with status, replicas and traffic", ()),
    ("get", "/apis/{name}", "One API in detail: tracker, errors, scaling events", ("window",)),
    ("delete", "/apis/{name}", "Stop serving an API and forget it", ()),
    ("post", "/apis/{name}/refresh", "Restart an API's replicas without downtime", ()),
    ("post", "/apis/{name}/rollback", "Roll an API's deployment back", ("revision",)),
    ("get", "/apis/{name}/logs", "The API's logs as JSON lines", ("follow", "tail")),
    (
        "get",
        "/apis/{name}/timeseries",
        "Per-minute requests by status class, p50/p90/p99, replicas and queue",
        ("window",),
    ),
    ("get", "/docs", "This API, as a web page", ()),
    ("get", "/openapi.json", "This API, as an OpenAPI document", ()),
)


def control_routes(server: Any) -> list[Route]:
    """The control-plane routes for `server` (an InferenceServer with deployments)."""
    api = ControlApi(server)
    handlers = {
        ("get", "/server"): api.server_info,
        ("post", "/deployments"): api.deploy,
        ("get", "/deployments"): api.list_deployments,
        ("get", "/deployments/{name}"): api.get_deployment,
        ("delete", "/deployments/{name}"): api.delete_deployment,
        ("get", "/apis"): api.list_apis,
        ("get", "/apis/{name}"): api.get_api,
        ("delete", "/apis/{name}"): api.delete_api,
        ("post", "/apis/{name}/refresh"): api.refresh,
        ("post", "/apis/{name}/rollback"): api.rollback,
        ("get", "/apis/{name}/logs"): api.logs,
        ("get", "/apis/{name}/timeseries"): api.timeseries,
        ("get", "/docs"): api.docs,
        ("get", "/openapi.json"): api.openapi,
    }
    from kiln.control.accounts_rest import account_routes
    from kiln.control.jobs_rest import job_routes
    from kiln.control.traffic_rest import traffic_routes

    routes = [
        Route(path, handlers[(method, path)], methods=[method.upper()])
        for method, path, _, _ in CONTROL_ROUTES
    ]
    return routes + account_routes(server) + job_routes(server) + traffic_routes(server, api_name)


class ControlApi:
    def __init__(self, server: Any) -> None:
        self.server = server

    @property
    def manager(self) -> Any:
        return self.server.deployments

    async def server_info(self, request: Request) -> Response:
        from kiln.control.status import server_info

        viewer = request.scope.get("state", {}).get("principal")
        return JSONResponse(server_info(self.server, viewer))

    async def deploy(self, request: Request) -> Response:
        kind = request.headers.get("content-type", "").split(";")[0].strip()
        if kind not in ("application/gzip", "application/x-gzip", "application/octet-stream"):
            raise UnsupportedMediaType(
                f"a deploy is a gzip'd tar of the project (Content-Type: application/gzip), "
                f"not {kind or 'no content type'}; `kiln deploy` packs and sends it for you"
            )
        principal = principal_of(request)
        limit, limit_name = self._upload_limit(principal)
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise PayloadTooLarge(
                f"the upload is {int(declared)} bytes, over {limit_name} of {_size(limit)}; "
                f"move data and model files out of the project (point model paths at storage) "
                f"or list them in .kilnignore"
            )
        incoming = self.manager.artifacts / ".incoming"
        upload = incoming / f"{os.getpid()}-{time.monotonic_ns()}.upload"
        try:
            size = await receive_to_file(request, upload, limit, limit_name)
            if not size:
                raise InvalidInput("the deploy request has no body; send the packed project")
            result = await self.manager.deploy(
                upload, request.query_params.get("name") or None, principal
            )
        except ConfigRejected as exc:
            return JSONResponse(
                {"code": 400, "type": exc.type, "message": exc.message, "issues": exc.issues},
                status_code=400,
            )
        finally:
            upload.unlink(missing_ok=True)
        status = 200 if result["status"] == "unchanged" else 202
        return JSONResponse(result, status_code=status)

    def _upload_limit(self, principal: Any) -> tuple[int, str]:
        """The most bytes one deploy upload may have: the user's plan, else the server's."""
        limit, name = MAX_ARCHIVE_BYTES, "the server's KILN_MAX_DEPLOY_BYTES"
        quotas = self.server.quotas
        if principal is not None and not principal.is_admin and quotas is not None:
            plan = quotas.plan_of(principal.user)
            if plan.max_upload_bytes is not None and plan.max_upload_bytes < limit:
                limit, name = plan.max_upload_bytes, f"the '{plan.name}' plan's max_upload_bytes"
        return limit, name

    async def list_deployments(self, request: Request) -> Response:
        deployments = await asyncio.to_thread(self.manager.store.list_deployments)
        principal = principal_of(request)
        out = [
            await asyncio.to_thread(self.manager.status_of, d.name)
            for d in deployments
            if principal is None or principal.owns(d.name)
        ]
        return JSONResponse({"deployments": out})

    async def get_deployment(self, request: Request) -> Response:
        name = deployment_name(request)
        return JSONResponse(await asyncio.to_thread(self.manager.status_of, name))

    async def delete_deployment(self, request: Request) -> Response:
        name = deployment_name(request)
        apis = [a for a, d in self.manager.owner.items() if d == name]
        if not apis:
            if await asyncio.to_thread(self.manager.store.get_deployment, name) is None:
                raise NotFound(f"no deployment named '{name}'")
            await asyncio.to_thread(self.manager.store.delete_deployment, name)
        for api in apis:
            await self.manager.delete_api(api)
        return JSONResponse({"deleted": name, "apis": apis})

    async def list_apis(self, request: Request) -> Response:
        from kiln.control.status import list_apis

        shown = await asyncio.to_thread(list_apis, self.server, principal_of(request))
        for entry in shown:
            _add_traffic_share(self.server, entry)
        return JSONResponse({"apis": shown})

    async def get_api(self, request: Request) -> Response:
        from kiln.control.status import api_detail
        from kiln.quantities import parse_duration

        try:
            window = parse_duration(request.query_params.get("window", "1h"))
        except ValueError as exc:
            raise InvalidInput(f"window: {exc}; use e.g. window=15m or window=1h") from None
        name = api_name(request)
        detail = await asyncio.to_thread(
            api_detail, self.server, name, window, principal_of(request)
        )
        group = self.server.registry.groups.get(name)
        if group is not None:
            detail["traffic"] = group.traffic()  # the split between versions, and shadow
            for entry in detail.get("versions") or ():
                _add_traffic_share(self.server, entry)
        return JSONResponse(detail)

    async def delete_api(self, request: Request) -> Response:
        return JSONResponse(await self.manager.delete_api(api_name(request)))

    async def refresh(self, request: Request) -> Response:
        return JSONResponse(await self.manager.refresh(api_name(request)), 202)

    async def rollback(self, request: Request) -> Response:
        revision = request.query_params.get("revision") or None
        result = await self.manager.rollback(api_name(request), revision)
        return JSONResponse(result, 202)

    async def logs(self, request: Request) -> Response:
        name = api_name(request)
        if name not in self.server.registry.groups:
            path = self.server.log.path_for(name)
            if not path.exists():
                raise NotFound(f"no API named '{name}'; `kiln get` lists the APIs")
        follow = request.query_params.get("follow", "false").lower() in ("1", "true", "yes")
        try:
            tail = int(request.query_params.get("tail", "200"))
        except ValueError:
            raise InvalidInput("tail must be a whole number of lines, e.g. tail=100") from None
        return StreamingResponse(
            tail_lines(
                self.server.log.path_for(name), tail, follow, request, flush=self.server.log.flush
            ),
            media_type="application/x-ndjson",
        )

    async def timeseries(self, request: Request) -> Response:
        from kiln.control.timeseries import WINDOWS

        window = request.query_params.get("window", "1h")
        if window not in WINDOWS:
            raise InvalidInput(f"window must be one of {', '.join(WINDOWS)}, not {window!r}")
        name = api_name(request)
        viewer = principal_of(request)
        jobs = self.server.jobs.apis if self.server.jobs is not None else {}
        if name not in self.server.registry.view(viewer).groups and not (
            name in jobs and (viewer is None or viewer.sees(name))
        ):
            raise NotFound(f"no API named '{name}'; `kiln get` lists the APIs")
        return JSONResponse(await asyncio.to_thread(self.server.series.points, name, window))

    async def docs(self, request: Request) -> Response:
        from kiln.protocols.openapi_docs import render_docs

        return HTMLResponse(render_docs(self._document(request)))

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(self._document(request))

    def _document(self, request: Request) -> dict[str, Any]:
        from kiln.control.accounts_rest import ACCOUNT_ROUTES
        from kiln.control.jobs_rest import JOB_ROUTES
        from kiln.control.traffic_rest import PUT_BODY, TRAFFIC_ROUTES
        from kiln.protocols.management_doc import management_document

        document = management_document(
            extra=CONTROL_ROUTES + ACCOUNT_ROUTES + JOB_ROUTES + TRAFFIC_ROUTES, extra_tag=TAG
        )
        document["paths"]["/apis/{name}/traffic"]["put"]["requestBody"] = PUT_BODY
        document["servers"] = [{"url": str(request.base_url).rstrip("/")}]
        return document


async def receive_to_file(request: Request, path: Path, limit: int, limit_name: str) -> int:
    """Stream the request body into `path`, chunk by chunk (never all in memory).

    Past `limit` bytes it stops reading, deletes the file and raises 413; so does
    any other failure (the client going away), so nothing is left on disk.
    Returns the number of bytes written.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    size = 0
    pending: list[bytes] = []  # up to ~1 MiB, written off the event loop
    try:
        with path.open("wb") as out:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(
                        f"the upload is over {limit_name} of {_size(limit)}; it was refused "
                        f"while streaming and nothing was kept. Move data and model files out "
                        f"of the project (point model paths at storage) or list them in "
                        f".kilnignore"
                    )
                pending.append(chunk)
                if sum(map(len, pending)) >= UPLOAD_WRITE_BYTES:
                    block, pending = b"".join(pending), []
                    await asyncio.to_thread(out.write, block)
            if pending:
                await asyncio.to_thread(out.write, b"".join(pending))
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return size


def _size(n: int) -> str:
    return f"{n} bytes ({n / 2**20:.4g} MiB)"


def _add_traffic_share(server: Any, entry: dict[str, Any]) -> None:
    """`traffic_percent` on a version's entry: its share of unversioned requests (100 for
    the default without a split, 0 for the others); "shadow" for a shadow version."""
    group = server.registry.groups.get(entry.get("name"))
    if group is None or entry.get("version") is None:
        return
    info = group.traffic()
    version = entry["version"]
    if info is None or not info["weights"]:
        entry["traffic_percent"] = 100.0 if version == group.default_version else 0.0
    else:
        entry["traffic_percent"] = info["percent"].get(version, 0.0)
    shadow = (info or {}).get("shadow")
    if shadow is not None and shadow["version"] == version:
        entry["shadow_percent"] = shadow["percent"]


def principal_of(request: Request) -> Any:
    """The caller (with API keys on), else None: auth off means the local developer."""
    return request.scope.get("state", {}).get("principal")


def api_name(request: Request) -> str:
    """The server's name for the API in the path: a user may leave out their namespace.

    An API the caller may not see answers like one that does not exist.
    """
    name = request.path_params["name"]
    principal = principal_of(request)
    if principal is None:
        return name
    if not principal.is_admin and not name.startswith(f"{principal.user}."):
        name = f"{principal.user}.{name}"
    if not principal.sees(name):
        raise NotFound(f"no API named '{request.path_params['name']}'; `kiln get` lists the APIs")
    return name


def deployment_name(request: Request) -> str:
    name = request.path_params["name"]
    principal = principal_of(request)
    if principal is None or principal.is_admin:
        return name
    if not name.startswith(f"{principal.user}."):
        name = f"{principal.user}.{name}"
    return name
