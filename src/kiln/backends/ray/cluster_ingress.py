"""`KilnClusterIngress`: the inference app of a `kiln server --backend ray` cluster.

The control plane (backends/ray/cluster.py) runs each API version's revision as
its own Serve application (one `KilnReplica` deployment named "api") and tells
this deployment which of them to route through Serve's `user_config`: a
`reconfigure` call on every ingress replica, without restarting it. The
manifest lists, per API version, the spec the control plane loaded (the tenant's
namespace and plan already applied) and the Serve application that serves it.

A changed entry (a new revision, a rollback, a refresh) gets a fresh
`RayServedApi` on the new application's handle, swapped in in one step as on
one machine (`Registry.swap`); the old one drains its queue in the background.
The control plane deletes the old application only after every ingress replica
has applied the manifest that no longer names it, so no request is sent to a
deleted application.

Keys, quotas and metering are decided against the control plane's store
(`store_url`, PostgreSQL), as in `KilnIngress`.
"""

from __future__ import annotations

import asyncio
import sys
from functools import partial
from typing import Any

from ray import serve

from kiln.backends.ray.ingress import RayServedApi
from kiln.backends.ray.replica import api_from_args
from kiln.backends.ray.telemetry import ForwardedLog, LogForwarder, MetricsForwarder
from kiln.control.logs import worker_record
from kiln.control.shared_quotas import shared_authority
from kiln.protocols.app import InferenceApp
from kiln.serving.router import Registry

REPLICA_DEPLOYMENT = "api"
"""The one deployment of every API version's Serve application."""
DRAIN_S = 30.0  # an old entry's queue after a swap (the control plane waits longer)


def _key(entry: dict[str, Any]) -> tuple[str, str | None]:
    return str(entry["name"]), entry.get("version")


@serve.deployment
@serve.ingress()
class KilnClusterIngress:
    """Kiln's inference app over the API versions the control plane's manifest names."""

    async def __init__(self, store_url: str | None = None) -> None:  # type: ignore[misc]
        self.registry = Registry()
        self.forwarder = LogForwarder()  # request records to the control plane's logs
        self.log = ForwardedLog(self.forwarder)
        self.forwarder.start()
        self.apps: dict[tuple[str, str | None], str] = {}  # (name, version) -> application
        self._lock = asyncio.Lock()
        self._draining: set[asyncio.Task[None]] = set()
        self.authority = shared_authority(store_url) if store_url else None
        self.metrics = MetricsForwarder(self.forwarder)
        self.inference_app = InferenceApp(
            self.registry, self.log, metrics=self.metrics, auth=self.authority
        )
        if self.authority is not None:  # metering, key reloads: every second
            self._accounts = asyncio.get_running_loop().create_task(self.authority.run())

    async def reconfigure(self, config: dict[str, Any]) -> None:
        """Route exactly the manifest's API versions (Serve calls this with `user_config`)."""
        async with self._lock:
            wanted = {_key(entry): entry for entry in config.get("apis", [])}
            for key, entry in wanted.items():
                if self.apps.get(key) != entry["app"]:
                    await self._route(entry)
            for key in [k for k in self.apps if k not in wanted]:
                old = self.registry.remove(*key)
                del self.apps[key]
                self._drain(old)
            splits = config.get("traffic") or {}
            for name, group in self.registry.groups.items():  # `kiln traffic` at runtime
                if group.override != splits.get(name):
                    group.set_traffic(splits.get(name))

    async def _route(self, entry: dict[str, Any]) -> None:
        api = api_from_args(entry["spec"], str(entry.get("root", "/")))
        handle = serve.get_deployment_handle(REPLICA_DEPLOYMENT, app_name=entry["app"])
        served = RayServedApi(
            api,
            handle,
            cwd="/",
            log_line=partial(self._log_line, api.name),
            revision=entry.get("revision"),
            observer=self.metrics,
        )
        try:
            await served.start()
        except Exception as exc:  # noqa: BLE001 - one API must not stop the others
            print(f"ray ingress: API '{api.name}' not routed: {exc}", file=sys.stderr)
            return
        old = self.registry.swap(served)
        self.apps[_key(entry)] = entry["app"]
        if old is not None:
            old.successor = served
            self._drain(old)

    def _drain(self, old: Any) -> None:
        task = asyncio.get_running_loop().create_task(old.stop(DRAIN_S))
        self._draining.add(task)
        task.add_done_callback(self._draining.discard)

    def _log_line(self, api: str, line: str, replica: str | None = None) -> None:
        self.log.write(api, worker_record(line, replica))

    async def __del__(self) -> None:
        """Serve calls this on a replica's graceful stop: write the last metered calls."""
        authority = getattr(self, "authority", None)
        if authority is not None:
            await asyncio.to_thread(authority.flush)

    def __serve_build_asgi_app__(self) -> Any:
        return self.inference_app
