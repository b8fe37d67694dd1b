"""Running the inference server in the foreground: bind, answer, load, announce, serve, drain.

Order matters: the ports are bound first (so port 0 is resolved and a busy port
fails before anything loads), every API is routed in state `loading`, and the
ports answer at once: liveness (`/healthz`, `/v2/health/live`) from the first
instant, readiness (`/ping`, `/v2/health/ready`) only once every API has
loaded, and a request to an API still loading waits for it within
`serving.startup_timeout_s` (then 503 with Retry-After), never 404. Once
everything is loaded the table of APIs is printed and `server.json` written.
On SIGINT or SIGTERM the HTTP servers stop accepting, requests in flight
finish, then workers are stopped and reaped, so nothing is left behind.

Here: that lifecycle, the sandbox choice and each API's wiring. What is opened
before the ports answer (the home's lock, the state store, accounts, jobs) is
`server_state.py`; the app on each port, the gRPC port and what is announced
about them (`RunningServer`, server.json) are `server_ports.py`.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.backends import Backend
from kiln.backends.local import LocalBackend
from kiln.control.envstep import prepare_served_folder, site_dirs_for
from kiln.control.host import (  # noqa: F401 - re-exported: the CLI imports them from here
    ServerError,
    bind_socket,
    is_loopback,
    remove_server_json,
    write_server_json,
)
from kiln.control.listeners import SHUTDOWN_GRACE_S, bind_ports
from kiln.control.logs import LogSink, worker_record
from kiln.control.server_ports import (
    Listening,
    RunningServer,
    bind_grpc,
    running_server,
    serve_ports,
    server_json,
)
from kiln.control.server_state import open_state
from kiln.sandbox import SandboxUnavailable
from kiln.sandbox.policy import SandboxPolicy
from kiln.serving import tracing
from kiln.serving.router import Registry, ServedApi

LOG_FLUSH_S = 0.2


@dataclass
class ServerOptions:
    host: str = "127.0.0.1"
    port: int = 8080
    management_port: int | None = 8081  # None: no management port
    metrics_port: int | None = 8082  # None: no metrics port
    enable_model_api: bool = False  # TorchServe's register/delete routes (off: ShellTorch)
    model_store: Path | None = None
    home: Path = field(default_factory=lambda: Path.home() / ".kiln")
    pointer_files: list[Path] = field(default_factory=list)  # extra copies of server.json
    quiet_logs: bool = False
    mode: str = "serve"  # "serve": `kiln serve DIR`; "server": the durable `kiln server run`
    auth: bool = False  # API keys on every route but health (on by default for `kiln server`)
    # Workers in the sandbox (docs/architecture.md, "Where user code runs"): None means the
    # mode's default, on for `kiln server` and off for `kiln serve`.
    sandbox: bool | None = None
    # Server variables the admin's ${VAR} may read (glob patterns, --pass-env).
    pass_env: list[str] = field(default_factory=list)
    edge: Any = None  # kiln.protocols.edge.EdgeLimits (server.yaml's `edge:`); None: defaults
    # With auth: the admin key to use instead of a generated one ($KILN_API_KEY in an image).
    admin_key: str | None = None
    # AsyncAPI webhooks may call these networks (CIDRs) though internal (--webhook-allow).
    webhook_allow: list[str] = field(default_factory=list)
    # The gRPC port (protocols/grpc): None turns it off. `grpc_required`: it was asked for
    # (a flag or server.yaml), so a missing grpc extra is an error rather than a note.
    grpc_port: int | None = None
    grpc_required: bool = False
    grpc_tls_cert: Path | None = None
    grpc_tls_key: Path | None = None
    # OpenTelemetry traces (serving/tracing.py): OTLP endpoint and protocol (--otlp-endpoint);
    # None: the OTEL_* variables decide.
    otlp_endpoint: str | None = None
    otlp_protocol: str | None = None
    # Where API versions run (kiln.backends): None is this machine's worker processes
    # (LocalBackend); `kiln server --backend ray` injects a RayBackend (the CLI imports it).
    backend: Any = None
    # The state store's URL (--store); None: $KILN_STATE_URL, else SQLite in the home.
    store_url: str | None = None
    # How long the server and its workers poll for an imminent answer before they sleep,
    # in microseconds (serving/polling.py; server.yaml `busy_poll_us`); 0 turns it off.
    busy_poll_us: int = 500


class InferenceServer:
    """One machine's Kiln: the inference, management and metrics ports over one registry.

    `project` is what `kiln serve DIR` serves in place from its folder (None for
    `kiln server run`); deployed projects come from the state store and the
    artifact store under `home` (see `deployments.py`).
    """

    def __init__(self, project: Any, options: ServerOptions) -> None:
        self.project = project
        self.options = options
        self.registry = Registry()
        self.backend: Backend = options.backend or LocalBackend()
        self.log = LogSink(options.home / "logs", quiet=options.quiet_logs)
        self.started = time.time()
        self.running: RunningServer | None = None
        self.store: Any = None
        self.deployments: Any = None
        self.jobs: Any = None  # kiln.batch.manager.JobManager: Batch APIs and their jobs
        self.counters: Any = None
        self.series: Any = None  # TimeSeries: per-minute history (issue 18)
        self.accounts: Any = None  # Accounts, with auth on
        self.quotas: Any = None  # QuotaGate, with auth on
        self.admin_key_file: Path | None = None
        self.home_lock: Any = None  # KILN_HOME's lock, held while the server lives
        self._listening: Listening | None = None  # the ports' HTTP servers, once serving
        self._grpc: Any = None  # kiln.protocols.grpc.server.GrpcServer, when the port is on
        from kiln.control.metrics import Metrics

        self.metrics = Metrics(self.registry)
        self._autoscalers: dict[int, asyncio.Task[None]] = {}
        self._stop_requested = asyncio.Event()
        self.pass_env = list(options.pass_env)
        self.sandbox_message = "off"
        self.sandbox = SandboxPolicy(enabled=False, inherit_env=options.mode == "serve")

    def _announce_sandbox(self) -> None:
        if self.sandbox.enabled:
            message = self.sandbox.caps.describe()
        elif self.options.mode == "server":
            message = (
                "sandbox: OFF (--unsafe-no-sandbox). Users' handlers run as this server's "
                "user with its files in reach: any user can read the admin key and the state "
                "database. Use it only when every user is trusted."
            )
        else:
            message = "sandbox: off (kiln serve runs your own code; --sandbox turns it on)"
        self.sandbox_message = message
        if self.sandbox.enabled or self.options.mode == "server":
            print(message, file=sys.stderr, flush=True)

    def _sandbox_policy(self) -> SandboxPolicy:
        """On for `kiln server` unless --unsafe-no-sandbox; off for `kiln serve` unless --sandbox.

        Asked for and unavailable, the server does not start: a multi-user server
        whose users' code can read its keys must be an explicit choice.
        """
        options = self.options
        enabled = options.sandbox if options.sandbox is not None else options.mode == "server"
        try:
            return SandboxPolicy(
                enabled=enabled,
                home=options.home,
                inherit_env=options.mode == "serve" and not enabled,
            )
        except SandboxUnavailable as exc:
            flag = "--unsafe-no-sandbox" if options.mode == "server" else "no --sandbox"
            raise ServerError(
                f"{exc}. Install it, or start with {flag} to run users' code unsandboxed "
                f"(any user's handler can then read this server's keys and files)"
            ) from None

    def served_api(self, api: Any, root: Path, tenant: str = "") -> ServedApi:
        """A ServedApi wired to this server's logs and metrics (also used by registration).

        On `kiln serve` the developer is the caller: a 500 from their code carries its
        message. On `kiln server` only the type and request id do, unless the API sets
        `serving.expose_errors: true` (the worker applies it: `to_kiln_error`).
        """
        served = self.backend.served_api(
            api,
            root=root,
            cwd=str(root),
            log_line=self._log_line(api.name),
            observer=self.metrics,
            sandbox=self.sandbox,
            tenant=tenant,
        )
        if self.options.mode != "server":
            served.worker_spec.expose_errors = True
        served.worker_spec.poll_us = self.options.busy_poll_us
        return served

    def _log_line(self, api: str) -> Callable[[str], None]:
        def write(line: str, replica: str | None = None) -> None:
            self.log.write(api, worker_record(line, replica))

        return write

    def request_stop(self) -> None:
        self._stop_requested.set()
        if self._listening is not None:
            self._listening.request_stop()
        if self._grpc is not None:
            self._grpc.request_stop()

    async def run(
        self,
        on_loading: Callable[[int], None] | None = None,
        on_ready: Callable[[RunningServer], None] | None = None,
    ) -> None:
        """Bind, open the state, answer on every port, load every API, serve, drain.

        The ports answer from before the first model loads: liveness at once,
        readiness (`/ping`, `/v2/health/ready`) once every API is loaded, and a
        request to an API still loading waits for it (`serving.startup_timeout_s`).
        `server.json` and `on_ready` come once everything has loaded.
        """
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.request_stop)
        self.sandbox = await asyncio.to_thread(self._sandbox_policy)
        self._announce_sandbox()
        options = self.options
        try:  # traces over OTLP when --otlp-endpoint or the OTEL_* variables name an endpoint
            tracing.configure(options.otlp_endpoint, options.otlp_protocol)
        except tracing.TracingError as exc:
            raise ServerError(str(exc)) from None
        ports = bind_ports(
            options.host, options.port, options.management_port, options.metrics_port
        )
        try:
            self._grpc = bind_grpc(options, self.log, self.metrics)
            open_state(self)  # the home's lock, the store, accounts, jobs (server_state.py)
            await self.backend.start(self)
            self.jobs.placer = self.backend  # where a job's workers run
        except ServerError:
            ports.close()
            if self._grpc is not None:
                await self._grpc.stop(0)
            raise
        flusher = asyncio.create_task(self._flush_logs())
        counters_task = asyncio.create_task(self.counters.run())
        series_task = asyncio.create_task(self.series.run())
        quota_task = asyncio.create_task(self.quotas.run()) if self.quotas else None
        serving: asyncio.Future[Any] | None = None
        try:
            loads = await self._register_apis()  # routed now, in state "loading"
            self.running = running_server(ports, self._grpc, self.registry.all())
            self._listening = serve_ports(self, ports, self._grpc)
            serving = asyncio.ensure_future(asyncio.gather(*self._listening.serving))
            if on_loading:
                on_loading(len(self.registry.all()))
            if not await self._load(loads, serving):
                return
            await self.backend.loaded()  # what it runs and nothing restored: gone
            self._start_autoscalers()
            self.jobs.asyncs.start()  # AsyncAPIs: run the queue once the APIs are up
            if os.environ.get("KILN_GC_TUNING", "1") != "0":
                # Everything loaded so far lives as long as the server: keep it out of the
                # collector's scans, and collect young objects less often, so a request
                # is not the one that pays for a full collection (the p99 tail).
                gc.collect()
                gc.freeze()
                gc.set_threshold(20_000, 20, 50)
            self.running.apis = self.registry.all()
            write_server_json(self._server_files(), server_json(self, self.running))
            if on_ready:
                on_ready(self.running)
            await serving
        finally:
            await self.backend.close()  # Ray's replicas keep serving without us
            if self.jobs is not None and self.jobs.asyncs is not None:
                await self.jobs.asyncs.close()  # stop claiming before the APIs drain
            stopping = asyncio.gather(
                *(s.stop(SHUTDOWN_GRACE_S) for s in self.registry.all_unfiltered()),
                return_exceptions=True,
            )
            if serving is not None and not serving.done():
                # Stopped (or failed) while loading: the APIs stop first, so requests
                # waiting for a load are answered, then the ports drain and close.
                self.request_stop()
                await stopping
                await asyncio.gather(serving, return_exceptions=True)
            else:
                await stopping
            flusher.cancel()
            counters_task.cancel()
            series_task.cancel()
            if quota_task is not None:
                quota_task.cancel()
            for task in self._autoscalers.values():
                task.cancel()
            await asyncio.to_thread(self.counters.flush)
            await asyncio.to_thread(self.series.flush)
            if self.quotas is not None:
                await asyncio.to_thread(self.quotas.flush)
            if self.jobs is not None:
                await self.jobs.close()
            if self._grpc is not None:
                await self._grpc.stop(0)  # already drained when it served; else never started
            self.store.close()
            ports.close()
            self._remove_server_json()
            self.log.close()

    async def _register_apis(self) -> list[Awaitable[Any]]:
        """Route every API before the ports open (state `loading`); return what loads them.

        Registering first is what lets readiness say "not yet" (not "nothing to
        serve, so ready") and lets an early request wait for its API instead of 404.
        """
        loads: list[Awaitable[Any]] = []
        if self.project is not None:
            served = [self.served_api(api, self.project.root) for api in self.project.apis]
            for served_api in served:
                self.registry.add(served_api)
            loads.append(self._load_served_folder(served))
        for restored in await self.deployments.restore():
            loads.append(self.deployments.bring_up(restored))
        return loads

    async def _load_served_folder(self, served: list[ServedApi]) -> None:
        """`kiln serve DIR`: its requirements.txt first, then its APIs' workers."""
        await prepare_served_folder(self.project)
        site_dirs = site_dirs_for(self.project.root)
        for served_api in served:
            served_api.worker_spec.site_dirs = site_dirs
        await asyncio.gather(*(s.start() for s in served))

    async def _load(self, loads: list[Awaitable[Any]], serving: asyncio.Future[Any]) -> bool:
        """Wait for every load; False when a stop came first. A port that fails ends it too."""
        loading = asyncio.ensure_future(asyncio.gather(*loads))
        stop_wait = asyncio.ensure_future(self._stop_requested.wait())
        await asyncio.wait([loading, stop_wait, serving], return_when=asyncio.FIRST_COMPLETED)
        stop_wait.cancel()
        if serving.done() and not loading.done():
            loading.cancel()
            serving.result()  # raises what stopped the port
            return False
        if self._stop_requested.is_set() and not loading.done():
            loading.cancel()
            return False
        loading.result()  # raises ServerError (e.g. requirements.txt failed) after cleanup
        return not self._stop_requested.is_set()

    def _start_autoscalers(self) -> None:
        for served in self.registry.all():
            self.start_autoscaler(served)

    def start_autoscaler(self, served: ServedApi) -> None:
        """Run the autoscaler for an API (at start, and for APIs registered later).

        The loop idles while the API's bounds leave nothing to decide (min == max).
        """
        from kiln.control.scaling import AutoscaleLoop

        if getattr(served, "scaled_by_backend", False):
            return  # Ray Serve scales it
        running = self._autoscalers.get(id(served))
        if running is not None and not running.done():
            return  # deployed while the server was still loading: it has its loop already
        on_scale = self.deployments.persist_scale if self.deployments is not None else None
        loop = AutoscaleLoop(served, self.log, on_scale=on_scale)
        self._autoscalers[id(served)] = asyncio.create_task(loop.run())

    def stop_autoscaler(self, served: ServedApi) -> None:
        task = self._autoscalers.pop(id(served), None)
        if task is not None:
            task.cancel()

    async def _flush_logs(self) -> None:
        while True:
            await asyncio.sleep(LOG_FLUSH_S)
            self.log.flush()

    def _server_files(self) -> list[Path]:
        return [self.options.home / "server.json", *self.options.pointer_files]

    def _remove_server_json(self) -> None:
        remove_server_json(self._server_files())
