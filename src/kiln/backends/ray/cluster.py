"""`RayBackend`: `kiln server --backend ray`, the control plane placing APIs on Ray Serve.

The control plane stays Kiln's own (deployments.py: uploads, revisions,
rollouts, rollback, refresh, delete, keys, usage, the store); only where an
API version runs changes. `InferenceServer.served_api` asks this backend, which
gives a `ClusterServedApi` (cluster_served.py) instead of local workers:

- each API version of each revision is its own Serve application
  (`<name>[@version]-<revision>`, one `KilnReplica` deployment named "api",
  `build_replica_app`), its project uploaded as the application's runtime_env
  `working_dir` (every node downloads it) with `requirements.txt` as `pip`;
  Serve places, supervises and autoscales its replicas (options.py's mapping);
- one ingress application, `kiln-ingress` at "/" behind Serve's HTTP proxy on
  every node (`KilnClusterIngress`), routes the API versions the control plane
  publishes in its `user_config` (a reconfigure, not a restart);
- a rolling update is blue/green over applications: the new revision's
  application starts beside the old one, the registry swaps (the control
  plane's own port at once, the ingress at the next publish), and the old
  application is deleted only after every ingress replica applied a manifest
  without it and its queue drained. Rollback and refresh are new revisions
  the same way; delete removes the application after the ingress let go.

Everything is applied declaratively (Serve's `deploy_apps` with the whole set of
Kiln's applications), so a control plane that restarts re-applies the same
configs and Serve keeps the replicas that did not change; applications of
APIs no longer deployed are deleted once the restore finished (`loaded`).
Stopping the control plane leaves the data plane serving.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from kiln.backends.ray.options import deployment_name, deployment_options, ingress_options
from kiln.backends.ray.project_env import project_runtime_env
from kiln.backends.ray.replica import spec_args
from kiln.control.host import ServerError

INGRESS_APP = "kiln-ingress"
INGRESS_DEPLOYMENT = "KilnClusterIngress"
REPLICA_IMPORT = "kiln.backends.ray.app:build_replica_app"
INGRESS_IMPORT = "kiln.backends.ray.app:build_cluster_ingress"
APPLY_TIMEOUT_S = 60.0  # for Serve to take a manifest (ingress reconfigured)
RELEASE_GRACE_S = 2.0  # after the ingress let go of an application, before it is deleted
DETAILS_EVERY_S = 2.0


class RayBackendError(ServerError):
    """The cluster cannot be reached or refused what Kiln asked; the message says what."""


class RayBackend:
    """Kiln's APIs as Ray Serve applications on the cluster at `address`."""

    name = "ray"
    local_outputs = False  # job workers write on other nodes: outputs must be s3:// or gs://

    def __init__(
        self,
        address: str,
        *,
        store_url: str | None,
        http_host: str = "127.0.0.1",
        http_port: int = 8000,
        ingress_replicas: int = 1,
    ) -> None:
        self.address = address
        self.store_url = store_url
        self.http_host = http_host
        self.http_port = http_port
        self.ingress_replicas = ingress_replicas
        self.server: Any = None
        self.closing = False
        self.sandbox = "on"
        self._apps: dict[str, dict[str, Any]] = {}  # application name -> its config
        self._holders: dict[str, set[int]] = {}  # application name -> ids of ClusterServedApis
        self._adopted: dict[str, dict[str, Any]] = {}  # found running, not yet re-placed
        self._applied: str | None = None  # the last config sent, as JSON
        self._lock = asyncio.Lock()
        self._details: dict[str, Any] = {}
        self._details_at = 0.0
        self._task: asyncio.Task[None] | None = None
        self._client: Any = None
        self._logs: Any = None  # the cluster's LogCollector actor

    # ---- lifecycle ------------------------------------------------------------------
    async def start(self, server: Any) -> None:
        """Connect as a Ray driver, start Serve's proxies if needed, adopt what runs."""
        self.server = server
        self.sandbox = "on" if server.sandbox.enabled else "off"
        await asyncio.to_thread(self._connect)
        self._task = asyncio.get_running_loop().create_task(self._sync_loop())

    def _connect(self) -> None:
        import ray
        from ray import serve

        try:
            ray.init(
                address=self.address,
                namespace="kiln",
                log_to_driver=False,
                ignore_reinit_error=True,
                logging_level=logging.WARNING,
            )
        except Exception as exc:  # noqa: BLE001 - say what and where
            raise RayBackendError(
                f"cannot connect to the Ray cluster at {self.address!r}: {exc}. Start one "
                f"(`ray start --head --node-ip-address 127.0.0.1`) or give --ray-address"
            ) from None
        serve.start(
            proxy_location="EveryNode",
            http_options={"host": self.http_host, "port": self.http_port},
        )
        self._client = serve.context._get_global_client()
        from kiln.backends.ray.telemetry import collector

        self._logs = collector(create=True)
        details = self._client.get_serve_details()
        for name, app in (details.get("applications") or {}).items():
            config = app.get("deployed_app_config") or {}
            if config.get("import_path") == REPLICA_IMPORT:
                self._adopted[name] = config

    async def loaded(self) -> None:
        """The control plane restored everything it serves: what it did not re-place goes."""
        self._adopted.clear()
        await self.publish()

    async def close(self) -> None:
        """The control plane stops; Serve keeps serving what it runs."""
        self.closing = True
        if self._task is not None:
            self._task.cancel()

    # ---- placing --------------------------------------------------------------------
    def served_api(self, api: Any, root: Path, *, tenant: str = "", **kwargs: Any) -> Any:
        from kiln.backends.ray.cluster_served import ClusterServedApi

        return ClusterServedApi(api, self, root, tenant=tenant, **kwargs)

    async def place(self, served: Any) -> str:
        """Run `served`'s revision as a Serve application; return its name once it runs.

        Raises RayBackendError with Serve's message when it cannot start (a replica
        that fails to load: the worker's error)."""
        api, root = served.api, Path(served.root)
        base = f"{deployment_name(api)}-{(served.revision or 'dev')[:12]}"
        runtime_env = await asyncio.to_thread(project_runtime_env, root)
        args = {
            "spec": spec_args(api, str(root)),
            "env": dict(served.extra_env),
            "sandbox": self.sandbox,
            "expose_errors": bool(served.worker_spec.expose_errors),
        }
        name = self._adoptable(base, args, runtime_env) or base
        # Held by another entry (a refresh, or a rollback while the old one drains): a
        # new application, so replicas restart and the other drains on its own.
        n = 0
        while self._holders.get(name):
            n += 1
            name = f"{base}-{n}"
        self._apps[name] = {
            "name": name,
            "import_path": REPLICA_IMPORT,
            "route_prefix": None,
            "args": args,
            "runtime_env": runtime_env,
            "deployments": [{"name": "api", **deployment_options(api)}],
        }
        self._holders.setdefault(name, set()).add(id(served))
        await self.publish()
        timeout = api.serving.startup_timeout_s + APPLY_TIMEOUT_S
        try:
            await self._until_running(name, timeout)
        except RayBackendError:
            await self.release(served, name)
            raise
        return name

    def _adoptable(
        self, base: str, args: dict[str, Any], runtime_env: dict[str, Any]
    ) -> str | None:
        """An application a previous control plane left running with exactly this config
        (a restart's restore): placing onto it restarts nothing."""
        for name, config in self._adopted.items():
            if not (name == base or name.startswith(base + "-")) or self._holders.get(name):
                continue
            if config.get("args") == args and config.get("runtime_env") == runtime_env:
                return name
        return None

    async def release(self, served: Any, name: str) -> None:
        """`served` no longer needs application `name`: once the ingress routes elsewhere,
        delete it (unless the control plane is stopping: Serve keeps serving then)."""
        holders = self._holders.get(name)
        if holders is not None:
            holders.discard(id(served))
        if self.closing or holders:
            return
        await self.publish()  # the ingress without it (the registry swapped or removed it)
        await asyncio.sleep(RELEASE_GRACE_S)
        if self._holders.get(name):  # taken again meanwhile (a rollback to it)
            return
        self._holders.pop(name, None)
        self._apps.pop(name, None)
        await self.publish()

    async def start_job_workers(self, job: Any, spec: Any, root: Path, env: dict[str, str]) -> Any:
        """A Batch API job's workers as actors on the cluster (cluster_jobs.py)."""
        from kiln.backends.ray.cluster_jobs import start_job_workers

        assert self.store_url is not None  # --backend ray needs the shared store
        return await start_job_workers(self.store_url, job, spec, root, env, self.sandbox)

    # ---- publishing -----------------------------------------------------------------
    def manifest(self) -> list[dict[str, Any]]:
        """The API versions the ingress routes: those the control plane routes, placed."""
        if self.server is None:
            return []
        out = []
        for served in self.server.registry.all_unfiltered():
            app = getattr(served, "app_name", None)
            if app is None or served.state not in ("ready", "scaled to zero"):
                continue
            out.append(
                {
                    "name": served.name,
                    "version": served.version,
                    "app": app,
                    "revision": served.revision,
                    "spec": self._apps[app]["args"]["spec"],
                }
            )
        return sorted(out, key=lambda e: (e["name"], e["version"] or ""))

    def traffic(self) -> dict[str, dict[str, int]]:
        """The runtime traffic splits (`kiln traffic`, set-default) of the APIs it routes."""
        if self.server is None:
            return {}
        groups = self.server.registry.groups
        return {name: dict(g.override) for name, g in groups.items() if g.override is not None}

    async def publish(self) -> None:
        """Send the whole set of Kiln's applications to Serve when it changed, and wait
        until every ingress replica applied the manifest in it."""
        async with self._lock:
            apis = self.manifest()
            apps = {**self._adopted, **self._apps}
            traffic = self.traffic()
            body = json.dumps(
                {"apis": apis, "apps": apps, "traffic": traffic}, sort_keys=True, default=str
            )
            if body == self._applied:
                return
            ingress = {
                "name": INGRESS_APP,
                "import_path": INGRESS_IMPORT,
                "route_prefix": "/",
                "args": {"store_url": self.store_url},
                "deployments": [
                    {
                        "name": INGRESS_DEPLOYMENT,
                        **ingress_options(),
                        "num_replicas": self.ingress_replicas,
                        "user_config": {"apis": apis, "traffic": traffic},
                    }
                ],
            }
            config = {"applications": [ingress, *apps.values()]}
            started = time.time()
            await asyncio.to_thread(self._apply, config)
            self._applied = body
            await self._until_running(INGRESS_APP, APPLY_TIMEOUT_S, since=started)

    def _apply(self, config: dict[str, Any]) -> None:
        from ray.serve.schema import ServeDeploySchema

        self._client.deploy_apps(ServeDeploySchema.model_validate(config))

    async def _until_running(self, app: str, timeout: float, since: float = 0.0) -> None:
        """Until Serve reports `app` RUNNING on a config applied after `since`; raises
        RayBackendError with Serve's message when it failed, or at the timeout."""
        deadline = time.monotonic() + timeout
        while True:
            details = await self._fresh_details()
            entry = (details.get("applications") or {}).get(app) or {}
            status = _text(entry.get("status"))
            current = (entry.get("last_deployed_time_s") or 0.0) >= since - 1.0
            if current and status == "RUNNING":
                return
            if current and status in ("DEPLOY_FAILED", "UNHEALTHY"):
                raise RayBackendError(_failure(entry))
            if time.monotonic() > deadline:
                raise RayBackendError(
                    f"Ray Serve did not run application '{app}' within {timeout:.0f} s "
                    f"(status {status or 'unknown'})"
                )
            await asyncio.sleep(0.2)

    async def _fresh_details(self) -> dict[str, Any]:
        self._details = await asyncio.to_thread(self._client.get_serve_details)
        self._details_at = time.monotonic()
        return self._details

    def replicas(self, app: str) -> list[dict[str, Any]]:
        """An application's replicas as Serve last reported them: node, pid, state."""
        entry = (self._details.get("applications") or {}).get(app) or {}
        rows = []
        for deployment in (entry.get("deployments") or {}).values():
            for replica in deployment.get("replicas") or []:
                rows.append(
                    {
                        "replica": replica.get("replica_id"),
                        "node": replica.get("node_id"),
                        "node_ip": replica.get("node_ip"),
                        "pid": replica.get("pid"),
                        "state": _text(replica.get("state")).lower(),
                    }
                )
        return rows

    async def _drain_logs(self) -> None:
        """The cluster's replica and ingress records into this server's logs, and the
        ingress's metric events into its metrics."""
        import ray

        from kiln.backends.ray.telemetry import replay

        drained = await asyncio.to_thread(ray.get, self._logs.drain.remote(), timeout=30)
        records, events, dropped = drained
        for api, record in records:
            self.server.log.write(api, record)
        for event in events:
            replay(self.server.metrics, event)
        if dropped:
            print(f"ray backend: {dropped} log records dropped while away", file=sys.stderr)

    async def _sync_loop(self) -> None:
        """Publish what changed without a deploy (a first revision became ready, a scale
        to zero) and keep the replicas' placement fresh for `kiln get`."""
        while True:
            await asyncio.sleep(1.0)
            try:
                await self._drain_logs()
                await self.publish()
                if time.monotonic() - self._details_at > DETAILS_EVERY_S:
                    await self._fresh_details()
            except Exception as exc:  # noqa: BLE001 - keep syncing; say why once a second
                print(f"ray backend: {exc}", file=sys.stderr, flush=True)


def _text(value: Any) -> str:
    """A Serve enum (a `str` Enum: str() would give its class name) or plain value as text."""
    return str(getattr(value, "value", value) or "")


def _failure(entry: dict[str, Any]) -> str:
    """Serve's reason an application failed, with the worker's own message when it has one."""
    messages = [str(entry.get("message") or "")]
    for deployment in (entry.get("deployments") or {}).values():
        if deployment.get("message"):
            messages.append(str(deployment["message"]))
    text = "\n".join(m for m in messages if m)
    # Serve wraps the replica's traceback; the user needs its last line, the worker's
    # error ("kiln.serving.replica.LoadFailed: RuntimeError: ..." -> "RuntimeError: ...").
    lines = [line for line in text.splitlines() if line and not line[0].isspace()]
    if not lines:
        return "Ray Serve could not start the API"
    last = lines[-1]
    if last.startswith("kiln.") and ": " in last:
        last = last.split(": ", 1)[1]
    return last[-2000:]


def store_url_for(given: str | None) -> str | None:
    """The store the ingress shares: --store, else $KILN_STATE_URL."""
    return given or os.environ.get("KILN_STATE_URL") or None
