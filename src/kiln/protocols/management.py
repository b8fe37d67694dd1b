"""The management port (8081): TorchServe's management API over Kiln's registry.

| route | what |
| --- | --- |
| `GET /models?limit=&next_page_token=` | list, paginated |
| `GET /models/{m}[/{v}]`, `/models/{m}/all` | describe the default, one or all versions |
| `PUT /models/{m}[/{v}]?min_worker=&max_worker=&synchronous=` | scale workers (0 unloads) |
| `PUT /models/{m}/{v}/set-default` | switch what unversioned routes of every protocol get |
| `POST /models?url=&model_name=&initial_workers=&synchronous=` | register from the model store |
| `DELETE /models/{m}[/{v}]` | unregister: out of routing, workers stopped |
| `OPTIONS /`, `GET /api-description` | this API as OpenAPI 3.0 |

Secure by default (ShellTorch, CVE-2023-43654): registering and deleting are
refused with 405 unless the server runs with `--enable-model-api`, and a
registration may only name a project folder or archive inside the model store
(see `model_store.py`). The port binds to 127.0.0.1 unless told otherwise.
Errors use TorchServe's shape `{"code", "type", "message"}`.

The management API is not the hot path, so it is a plain Starlette app. This
module holds its handlers (`Management`) and builds the app; the route table and
its OpenAPI document are `management_doc.py`, and query parsing, worker
descriptions and the TorchServe-shaped error handlers are `management_http.py`.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from kiln.errors import Conflict, InvalidInput, KilnError, MethodNotAllowed
from kiln.protocols.management_describe import customized_metadata, describe
from kiln.protocols.management_doc import ROUTES, management_document
from kiln.protocols.management_http import (
    _flag,
    _http_error,
    _int_param,
    _kiln_error,
    _load_apis,
    _unexpected,
)
from kiln.protocols.model_store import prepare_project
from kiln.serving.caps import check_replicas, replica_caps
from kiln.serving.router import ApiGroup, Registry, ServedApi

MAX_PAGE = 1000
STOP_GRACE_S = 30.0
_ENABLE_FLAG = "--enable-model-api"


@dataclass
class ModelRecord:
    """What the management API knows about a version beyond its ServedApi."""

    url: str
    loaded_at_startup: bool
    min_workers: int | None = None
    max_workers: int | None = None


class Management:
    def __init__(self, registry: Registry, log: Any, server: Any = None) -> None:
        self.registry = registry
        self.log = log
        self.server = server
        self.records: dict[int, ModelRecord] = {}  # by id(ServedApi)
        self._locks: dict[int, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    # ----- helpers -------------------------------------------------------------------
    @property
    def enabled(self) -> bool:
        options = getattr(self.server, "options", None)
        return bool(getattr(options, "enable_model_api", False))

    def model_store(self) -> Path:
        options = self.server.options
        return Path(options.model_store or Path(options.home) / "model-store")

    def record(self, served: ServedApi) -> ModelRecord:
        record = self.records.get(id(served))
        if record is None:
            project = getattr(self.server, "project", None)
            root = getattr(project, "root", None)
            url = Path(root).name if root is not None else served.api.endpoint
            record = self.records[id(served)] = ModelRecord(url=url, loaded_at_startup=True)
        return record

    def lock(self, served: ServedApi) -> asyncio.Lock:
        return self._locks.setdefault(id(served), asyncio.Lock())

    def spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def audit(self, api: str, action: str, **fields: Any) -> None:
        if self.log is not None:
            self.log.write(api, {"event": "management", "action": action, **fields})

    def require_model_api(self, what: str) -> None:
        if not self.enabled:
            err = MethodNotAllowed(
                f"{what} is disabled on this server; restart it with {_ENABLE_FLAG} to allow "
                "registering and deleting models (only on a trusted network)"
            )
            raise err

    def visible(self, request: Request) -> Any:
        """The registry as this request's caller sees it (ManagementGate's principal)."""
        return self.registry.view(request.scope.get("state", {}).get("principal"))

    def lookup(
        self, request: Request, name: str, version: str | None
    ) -> tuple[ApiGroup, ServedApi]:
        group = self.visible(request).by_name(name)
        return group, group.get(version)

    # ----- describe ------------------------------------------------------------------
    def describe(self, served: ServedApi, group: ApiGroup) -> dict[str, Any]:
        return describe(served, group, self.record(served))

    async def list_models(self, request: Request) -> Response:
        limit = _int_param(request, "limit", 100)
        if not 1 <= limit <= MAX_PAGE:
            raise InvalidInput(f"limit must be between 1 and {MAX_PAGE}")
        start = _int_param(request, "next_page_token", 0)
        if start < 0:
            raise InvalidInput("next_page_token must be a token from a previous page")
        groups = self.visible(request).groups
        names = sorted(groups)
        page = names[start : start + limit]
        body: dict[str, Any] = {}
        if start + limit < len(names):
            body["nextPageToken"] = str(start + limit)
        body["models"] = [
            {"modelName": name, "modelUrl": self.record(groups[name].default).url} for name in page
        ]
        return JSONResponse(body)

    async def describe_model(self, request: Request) -> Response:
        name = request.path_params["model"]
        version = request.path_params.get("version")
        group, served = self.lookup(request, name, version)
        return JSONResponse([await self.describe_asked(request, served, group)])

    async def describe_all(self, request: Request) -> Response:
        group = self.visible(request).by_name(request.path_params["model"])
        ordered = sorted(group.versions.values(), key=lambda s: str(s.version or ""))
        return JSONResponse([await self.describe_asked(request, s, group) for s in ordered])

    async def describe_asked(
        self, request: Request, served: ServedApi, group: ApiGroup
    ) -> dict[str, Any]:
        """`describe`, plus TorchServe's `customizedMetadata` with `?customized=true`."""
        entry = self.describe(served, group)
        if request.query_params.get("customized", "").lower() == "true":
            entry["customizedMetadata"] = await customized_metadata(served)
        return entry

    # ----- scale ---------------------------------------------------------------------
    async def scale(self, request: Request) -> Response:
        name = request.path_params["model"]
        version = request.path_params.get("version")
        _, served = self.lookup(request, name, version)
        minimum = _int_param(request, "min_worker", 1)
        maximum = _int_param(request, "max_worker", minimum)
        if minimum < 0:
            raise InvalidInput("min_worker must be 0 or more (0 stops every worker)")
        if maximum < minimum:
            raise InvalidInput(
                f"max_worker ({maximum}) is smaller than min_worker ({minimum}); "
                "give max_worker >= min_worker"
            )
        if _int_param(request, "number_gpu", 0) > 0:
            raise InvalidInput(
                "number_gpu is not supported here: set compute.gpu in kiln.yaml instead"
            )
        self.check_workers(served.name, served.api.compute, min_worker=minimum, max_worker=maximum)
        target = f"model: {name}" + (f", version: {version}" if version is not None else "")
        if not _flag(request, "synchronous"):
            self.spawn(self._scale(served, minimum, maximum))
            return JSONResponse({"status": "Processing worker updates..."}, status_code=202)
        await self._scale(served, minimum, maximum)
        ready = len(served.ready_slots())
        if ready < minimum:
            raise KilnError(
                f"{ready} of {minimum} workers of {target} are ready; the others failed to "
                f"start ({served.error}); see the API's log"
            )
        return JSONResponse({"status": f"Workers scaled to {minimum} for {target}"})

    async def _scale(self, served: ServedApi, minimum: int, maximum: int) -> None:
        async with self.lock(served):
            record = self.record(served)
            record.min_workers, record.max_workers = minimum, maximum
            # TorchServe's min/max_worker become the autoscaler's bounds for this version.
            served.bounds_override = (minimum, max(minimum, maximum))
            if minimum == 0:
                await served.unload()
            else:
                if served.unloaded or not served.slots:
                    await served.load()
                if len(served.slots) != minimum:
                    await served.scale(minimum)
        self.audit(served.name, "scale", version=served.version, workers=minimum)

    def check_workers(self, name: str, compute: Any, **asked: int) -> None:
        """A worker count over the API's cap (its max_replicas, the machine, the owner's
        plan) is a 400 naming the cap: never clamped, never started."""
        quotas = getattr(self.server, "quotas", None)
        extra = quotas.replica_caps_for(name) if quotas is not None else []
        check_replicas(name, asked, replica_caps(compute, extra))

    # ----- set default ---------------------------------------------------------------
    async def set_default(self, request: Request) -> Response:
        name = request.path_params["model"]
        version = request.path_params["version"]
        group = self.visible(request).by_name(name)
        before = group.override
        group.set_default(version)  # with a traffic split: 100% on this version from now
        store = self.registry.traffic_store
        if group.override != before and store is not None:  # kept across restarts
            await asyncio.to_thread(store.set_traffic, group.name, group.override)
        self.audit(name, "set-default", version=version)
        return JSONResponse(
            {"status": f'Default version successfully updated for model "{name}" to "{version}"'}
        )

    # ----- unregister ----------------------------------------------------------------
    async def unregister(self, request: Request) -> Response:
        self.require_model_api("DELETE /models")
        name = request.path_params["model"]
        version = request.path_params.get("version")
        group, served = self.lookup(request, name, version)
        if served is group.default and len(group.versions) > 1:
            raise InvalidInput(
                f"version {served.version} is the default of model '{name}' and others remain; "
                f"make another the default first (PUT /models/{name}/VERSION/set-default)"
            )
        self.registry.remove(name, served.version)  # new requests get 404 from here on
        self.audit(name, "unregister", version=served.version)
        async with self.lock(served):  # after any scale in progress
            await served.stop(STOP_GRACE_S)
        self.records.pop(id(served), None)
        self._locks.pop(id(served), None)
        what = f'Model "{name}"' + (f" version {served.version}" if served.version else "")
        return JSONResponse({"status": f"{what} unregistered"})

    # ----- register ------------------------------------------------------------------
    async def register(self, request: Request) -> Response:
        self.require_model_api("POST /models (model registration)")
        if self.server is None:
            raise KilnError("this management app has no server to register models into")
        url = request.query_params.get("url")
        if not url:
            raise InvalidInput(
                "the url parameter is required: the name of a project folder or "
                ".zip / .tar.gz archive in the model store"
            )
        wanted = request.query_params.get("model_name") or None
        initial = request.query_params.get("initial_workers")
        workers = _int_param(request, "initial_workers", 0) if initial is not None else None
        if workers is not None and workers < 0:
            raise InvalidInput("initial_workers must be 0 or more")
        batch_size = _int_param(request, "batch_size", 0)
        batch_delay = _int_param(request, "max_batch_delay", -1)
        if request.query_params.get("batch_size") is not None and batch_size < 1:
            raise InvalidInput("batch_size must be 1 or more")
        cache = Path(self.server.options.home) / "model-cache"
        root = await run_in_threadpool(prepare_project, self.model_store(), url, cache)
        apis = await run_in_threadpool(_load_apis, root, url)
        if wanted is not None:
            names = sorted({a.name for a in apis})
            apis = [a for a in apis if a.name == wanted]
            if not apis:
                raise InvalidInput(
                    f"'{url}' has no API named '{wanted}' (it has: {', '.join(names)}); "
                    "pass one of those as model_name, or leave model_name out"
                )
        self._check_conflicts(apis)
        if workers:
            for api in apis:
                self.check_workers(api.name, api.compute, initial_workers=workers)
        new = [self._served_api(api, root) for api in apis]
        for served in new:  # TorchServe's batch_size / max_batch_delay override kiln.yaml
            if batch_size or batch_delay >= 0:
                delay = batch_delay if batch_delay >= 0 else served.batch_delay_s * 1000
                served.set_batching(batch_size or served.max_batch_size, delay)
        for served in new:
            self._add(served, url)
        self.audit(new[0].name, "register", url=url, versions=[s.version for s in new])
        if not _flag(request, "synchronous"):
            for served in new:
                self.spawn(self._start(served, workers))
            return JSONResponse({"status": "Processing worker updates..."}, status_code=202)
        await asyncio.gather(*(self._start(served, workers) for served in new))
        failed = [s for s in new if s.state == "failed"]
        if failed:
            for served in new:
                self.registry.remove(served.name, served.version)
                self.records.pop(id(served), None)
            await asyncio.gather(*(s.stop(1) for s in new), return_exceptions=True)
            raise KilnError(
                f"model '{failed[0].name}' failed to load and was not registered: {failed[0].error}"
            )
        messages = [
            f'Model "{s.name}" Version: {s.version or "-"} registered with '
            f"{len(s.ready_slots())} initial workers"
            for s in new
        ]
        return JSONResponse({"status": "; ".join(messages)})

    def _served_api(self, api: Any, root: Path) -> ServedApi:
        make = getattr(self.server, "served_api", None)
        if make is not None:  # wired to the server's logs and metrics
            return make(api, root)
        return ServedApi(api, cwd=str(root), log_line=self.server._log_line(api.name))

    def _check_conflicts(self, apis: list[Any]) -> None:
        seen: set[tuple[str, str | None]] = set()
        for api in apis:
            key = (api.name, api.version)
            group = self.registry.groups.get(api.name)
            if key in seen or (group is not None and api.version in group.versions):
                label = f"'{api.name}'" + (f" version {api.version}" if api.version else "")
                raise Conflict(
                    f"model {label} is already registered; unregister it first or give the "
                    "new one another version"
                )
            seen.add(key)
            if group is not None and group.endpoint != api.endpoint:
                raise Conflict(
                    f"model '{api.name}' is served at {group.endpoint}; a new version must use "
                    f"the same endpoint (this one asks for {api.endpoint})"
                )
            owner = self.registry.by_endpoint(api.endpoint)
            if owner is not None and owner.name != api.name:
                raise Conflict(
                    f"endpoint {api.endpoint} already serves model '{owner.name}'; "
                    "set another endpoint in kiln.yaml"
                )

    def _add(self, served: ServedApi, url: str) -> None:
        group = self.registry.groups.get(served.name)
        if group is not None and group.versions:
            # A new version never moves unversioned traffic unless it says `default: true`.
            group.set_default(group.default_version, reset_split=False)
        self.registry.add(served)
        if group is not None and served.api.default:
            group.set_default(served.version, reset_split=False)
        self.records[id(served)] = ModelRecord(url=url, loaded_at_startup=False)

    async def _start(self, served: ServedApi, workers: int | None) -> None:
        async with self.lock(served):
            await served.start()
            start_autoscaler = getattr(self.server, "start_autoscaler", None)
            if start_autoscaler is not None:
                start_autoscaler(served)
            if workers is not None:
                record = self.record(served)
                record.min_workers = record.max_workers = workers
                served.bounds_override = (workers, max(workers, 1))
                if workers == 0:
                    await served.unload()
                elif workers != len(served.slots):
                    await served.scale(workers)

    # ----- description ---------------------------------------------------------------
    async def api_description(self, request: Request) -> Response:
        return JSONResponse(management_document())


def build_management_app(
    registry: Registry, log: Any, server: Any = None, extra_routes: list[Route] | None = None
) -> Starlette:
    """The management port's app over `registry`; `server` is the InferenceServer.

    `extra_routes` are the control plane's (`kiln.control.rest`), which the server
    passes in: protocols never import the control plane.
    """
    mgmt = Management(registry, log, server)
    handlers = {
        ("options", "/"): mgmt.api_description,
        ("get", "/api-description"): mgmt.api_description,
        ("get", "/models"): mgmt.list_models,
        ("post", "/models"): mgmt.register,
        ("get", "/models/{model}"): mgmt.describe_model,
        ("put", "/models/{model}"): mgmt.scale,
        ("delete", "/models/{model}"): mgmt.unregister,
        ("get", "/models/{model}/all"): mgmt.describe_all,
        ("get", "/models/{model}/{version}"): mgmt.describe_model,
        ("put", "/models/{model}/{version}"): mgmt.scale,
        ("delete", "/models/{model}/{version}"): mgmt.unregister,
        ("put", "/models/{model}/{version}/set-default"): mgmt.set_default,
    }
    routes = [
        Route(path, handlers[(method, path)], methods=[method.upper()])
        for method, path, _, _ in ROUTES
    ]
    routes += extra_routes or []
    app = Starlette(
        routes=routes,
        exception_handlers={
            KilnError: _kiln_error,
            HTTPException: _http_error,
            Exception: _unexpected,
        },
    )
    app.state.management = mgmt
    return app
