"""Which worker answers a request: APIs by endpoint and name, versions, supervision.

A `ServedApi` is one API version with its worker; it restarts the worker with
backoff when it dies, and makes early requests wait for the model to load
(seed 003's "GET to ping and load"). A `Registry` maps endpoints and names to
the versions behind them and picks the default version.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import time
from collections.abc import Callable
from typing import Any

from kiln.errors import NotFound, Unavailable
from kiln.serving.replica import LoadFailed, Replica
from kiln.serving.types import InferenceRequest, InferenceResponse, WorkerSpec

MAX_BACKOFF_S = 30.0


def worker_spec_for(api: Any) -> WorkerSpec:
    """The plain data a worker needs, from a validated `kiln.config.ApiSpec`."""
    block = api.runtime_block
    handler = getattr(block, "handler", None) if api.runtime in ("python", "torch") else None
    return WorkerSpec(
        api=api.name,
        version=api.version,
        runtime=api.runtime,
        model_path=api.model_path,
        request_handler=api.request_handler_path,
        handler=handler,
        signature_key=getattr(block, "signature_key", None),
        method=getattr(block, "method", "predict"),
        trusted=bool(getattr(block, "trusted", False)),
        signature=getattr(block, "signature", None),
        config=dict(api.config or {}),
        metadata=dict(api.metadata or {}),
        python_path=api.python_path,
        threads=max(1, math.ceil(api.compute.cpu or 1)),
        response_envelope=api.response_envelope,
    )


class ServedApi:
    """One API version and the worker behind it."""

    def __init__(
        self,
        api: Any,
        *,
        cwd: str,
        log_line: Callable[[str], None],
    ) -> None:
        self.api = api
        self.name: str = api.name
        self.version: str | None = api.version
        self.worker_spec = worker_spec_for(api)
        self._cwd = cwd
        self._log_line = log_line
        self.state = "loading"
        self.error: str | None = None
        self.restarts = 0
        self.replica: Replica | None = None
        self._ready = asyncio.Event()
        self._stopping = False
        self._restart_task: asyncio.Task[None] | None = None

    @property
    def signature(self) -> dict[str, Any]:
        return self.replica.signature if self.replica else {}

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        spec = self.worker_spec
        paths = [p for p in (spec.python_path, env.get("PYTHONPATH")) if p]
        env["PYTHONPATH"] = os.pathsep.join(paths)
        if spec.model_path:
            model_dir = spec.model_path
            env["MODEL_DIR"] = model_dir if os.path.isdir(model_dir) else os.path.dirname(model_dir)
        env["OMP_NUM_THREADS"] = str(spec.threads)
        env["KILN_API"] = spec.api
        env["PYTHONUNBUFFERED"] = "1"
        return env

    async def start(self) -> None:
        """Start the worker and wait for the model; a load failure leaves the API in `failed`."""
        self.state = "loading" if self.restarts == 0 else "restarting"
        self._ready.clear()
        replica = Replica(
            self.worker_spec,
            cwd=self._cwd,
            env=self._env(),
            log_line=self._log_line,
            on_exit=self._on_worker_exit,
        )
        try:
            await replica.start(self.api.serving.startup_timeout_s)
        except LoadFailed as exc:
            self.state, self.error = "failed", str(exc)
            self._log_line(f"failed to load: {exc}")
            self._ready.set()  # wake waiters so they get the error instead of hanging
            return
        self.replica = replica
        self.state, self.error = "ready", None
        self._ready.set()

    async def _on_worker_exit(self, replica: Replica) -> None:
        if self._stopping or replica is not self.replica:
            return
        self.state = "restarting"
        self._ready.clear()
        self._log_line("worker exited unexpectedly; restarting it")
        self._restart_task = asyncio.create_task(self._restart_with_backoff())

    async def _restart_with_backoff(self) -> None:
        delay = 0.2
        while not self._stopping:
            self.restarts += 1
            await self.start()
            if self.state == "ready":
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_BACKOFF_S)

    async def wait_ready(self, timeout: float) -> None:
        if self.state == "ready":
            return
        if self.state == "failed" and self._restart_task is None:
            raise Unavailable(f"API '{self.name}' failed to load: {self.error}")
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except TimeoutError:
            raise Unavailable(
                f"API '{self.name}' is still {self.state}; retry shortly", retry_after=1
            ) from None
        if self.state != "ready":
            raise Unavailable(f"API '{self.name}' failed to load: {self.error}", retry_after=5)

    async def predict(self, request: InferenceRequest) -> InferenceResponse:
        serving = self.api.serving
        if self.state != "ready":
            await self.wait_ready(serving.startup_timeout_s)
        assert self.replica is not None
        timeout = serving.response_timeout_s
        if request.deadline is not None:
            timeout = min(timeout, max(0.0, request.deadline - time.monotonic()))
        return await self.replica.submit(request, timeout)

    async def stop(self, grace: float) -> None:
        self._stopping = True
        self.state = "stopped"
        if self._restart_task is not None:
            self._restart_task.cancel()
        if self.replica is not None:
            await self.replica.stop(grace)

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "name": self.name,
            "version": self.version,
            "endpoint": self.api.endpoint,
            "runtime": self.api.runtime,
            "status": self.state,
        }
        if self.error:
            info["error"] = self.error
        return info


def _version_key(version: str | None) -> tuple[Any, ...]:
    if version is None:
        return ()
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"[.\-]", version))


class ApiGroup:
    """All versions of one API name, served at one endpoint."""

    def __init__(self, name: str, endpoint: str) -> None:
        self.name = name
        self.endpoint = endpoint
        self.versions: dict[str | None, ServedApi] = {}

    @property
    def default(self) -> ServedApi:
        marked = [v for v in self.versions.values() if v.api.default]
        if marked:
            return marked[0]
        return max(self.versions.values(), key=lambda v: _version_key(v.version))

    def get(self, version: str | None) -> ServedApi:
        if version is None:
            return self.default
        served = self.versions.get(version)
        if served is None:
            known = ", ".join(sorted(str(v) for v in self.versions if v is not None)) or "none"
            raise NotFound(f"API '{self.name}' has no version '{version}' (versions: {known})")
        return served


class Registry:
    """The APIs this server answers for."""

    def __init__(self) -> None:
        self.groups: dict[str, ApiGroup] = {}
        self._by_endpoint: dict[str, ApiGroup] = {}

    def add(self, served: ServedApi) -> None:
        group = self.groups.get(served.name)
        if group is None:
            group = self.groups[served.name] = ApiGroup(served.name, served.api.endpoint)
            self._by_endpoint[served.api.endpoint.rstrip("/") or "/"] = group
        group.versions[served.version] = served

    def by_endpoint(self, path: str) -> ApiGroup | None:
        return self._by_endpoint.get(path.rstrip("/") or "/")

    def by_name(self, name: str) -> ApiGroup:
        group = self.groups.get(name)
        if group is None:
            raise NotFound(f"no API named '{name}'; GET /apis lists the APIs this server has")
        return group

    def all(self) -> list[ServedApi]:
        return [served for group in self.groups.values() for served in group.versions.values()]
