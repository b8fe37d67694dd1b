"""`KilnReplica`: one Ray Serve replica of an API version, owning one Kiln worker process.

The actor is not where user code runs. It starts a Kiln worker subprocess from a
`LaunchSpec`, as `ReplicaPool` does on one machine (serving/replica_pool.py), and
talks to it through a real `serving.replica.Replica`: the same spawn, typed IPC,
deadlines and death detection. So on Ray a handler gets what it gets locally: a
clean environment (its deployment's `env:` and `.env`, never the actor's), the
sandbox when the node has one (its own /tmp: no Ray session folder, no
`ray_current_cluster` file), and no Ray address or token: `ray.init(address="auto")`
inside a handler fails.

A batch arrives as bytes (frames.py: nothing a client sent is unpickled) and its
outcomes leave as bytes, with this node's id for `kiln get` and the tests. When the
worker dies the health check fails, so Serve replaces the whole replica (Serve,
not this actor, supervises); batches sent meanwhile come back "not started" and
the ingress queues them again.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from typing import Any

import ray
from ray import serve

from kiln.backends.ray.frames import reply_frame, requests_from_frame
from kiln.backends.ray.telemetry import LogForwarder
from kiln.config import ApiSpec, load_project
from kiln.control.logs import worker_record
from kiln.errors import KilnError
from kiln.sandbox import LaunchSpec, Limits
from kiln.sandbox.policy import SandboxPolicy
from kiln.sandbox.probe import SandboxUnavailable
from kiln.serving.placement import cores_for, worker_env, worker_spec_for
from kiln.serving.replica import Replica
from kiln.serving.replica_traffic import NotStarted
from kiln.serving.wire import wire_error

NOT_STARTED = b""
"""The reply for a batch this replica could not start (its worker is gone): requeue it."""
ROOT_MARK = "@kiln-project-root@"
"""Stands for the project's folder in a spec sent by the control plane (`spec_args`):
the folder is the control plane's; on a node it is the replica's runtime_env working_dir."""


def spec_args(api: Any, root: str) -> dict[str, Any]:
    """An API version's spec as Serve application args (JSON), its paths made relative to
    the project folder; `api_from_args` on the node puts them under its working_dir."""
    text = json.dumps(api.model_dump(mode="json")).replace(root.rstrip("/"), ROOT_MARK)
    return dict(json.loads(text))


def api_from_args(spec: dict[str, Any], root: str) -> Any:
    """The API version a control plane sent (`spec_args`), its paths under `root`."""
    from kiln.config.schema import AsyncApiSpec, BatchApiSpec

    data = json.loads(json.dumps(spec).replace(ROOT_MARK, root.rstrip("/")))
    models: dict[str, Any] = {"AsyncAPI": AsyncApiSpec, "BatchAPI": BatchApiSpec}
    model = models.get(str(spec.get("kind")), ApiSpec)
    # A user's API is `<user>.<name>` (the control plane's namespace), which kiln.yaml's
    # name rule refuses: validate the name the user wrote, then put the namespace back.
    name = str(data["name"])
    data["name"] = name.rsplit(".", 1)[-1]
    return model.model_validate(data).model_copy(update={"name": name})


def clean_env(env: dict[str, str]) -> dict[str, str]:
    """The worker's environment without anything of Ray's (address, token, session dir).

    `worker_env` already starts from a minimal base; this is the second line, for a
    deployment's `env:` that would name one of them."""
    return {
        k: v
        for k, v in env.items()
        if not k.startswith("RAY_") and k not in ("RAY", "REDIS_ADDRESS")
    }


def sandbox_policy(mode: str) -> SandboxPolicy:
    """ "on": the sandbox or an error; "off": none; "auto": the sandbox where the node has it."""
    if mode == "off":
        return SandboxPolicy(enabled=False)
    try:
        return SandboxPolicy(enabled=True)
    except SandboxUnavailable:
        if mode == "on":
            raise
        return SandboxPolicy(enabled=False)


def launch_factory(api: ApiSpec, root: str, policy: SandboxPolicy, env: dict[str, str]) -> Any:
    """How this replica's worker starts: the LaunchSpec ReplicaPool would build locally."""
    spec = worker_spec_for(api)
    readable = list(spec.site_dirs)
    for path in (spec.model_path, spec.python_path):
        if path:
            full = os.path.join(root, path)
            readable.append(full if os.path.isdir(full) else os.path.dirname(full))
    limits = Limits(mem_bytes=api.compute.mem, cpu=api.compute.cpu)

    def launch(argv: list[str], pass_fds: tuple[int, ...]) -> LaunchSpec:
        return policy.launch(
            argv,
            env,
            cwd=root,
            pass_fds=pass_fds,
            read_only=readable,
            network=api.network,
            limits=limits,
            name=f"{api.name}-ray",
        )

    return launch


@serve.deployment
class KilnReplica:
    """One API version's replica: a Kiln worker subprocess behind a Serve actor."""

    async def __init__(  # type: ignore[misc]  # Serve runs an async constructor
        self,
        project_dir: str,
        config_file: str | None,
        api_name: str,
        version: str | None,
        sandbox: str = "auto",
        spec: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
        expose_errors: bool = False,
    ) -> None:
        """From a project folder on the node (`build_app`: a Serve config or KubeRay), or,
        with `spec`, from the API a Kiln control plane sent (`build_replica_app`), the
        project being this replica's runtime_env working_dir (the current folder)."""
        if spec is not None:
            root = os.getcwd()
            api = api_from_args(spec, root)
            declared = dict(env or {})
        else:
            project = load_project(project_dir, config_file)
            found = project.api(api_name, version)
            if found is None:
                raise ValueError(f"API '{api_name}' version {version!r} is not in {project_dir}")
            api, root, declared = found, str(project.root), dict(found.worker_env)
        self.api = api
        self.node_id: str = ray.get_runtime_context().get_node_id()
        self.replica_id: str = serve.get_replica_context().replica_id.unique_id
        self.forwarder = LogForwarder()  # to the control plane's `kiln logs`, when there is one
        self.forwarder.start()
        self.policy = sandbox_policy(sandbox)
        worker = worker_spec_for(api)
        worker.cpus = cores_for(api.compute.cpu or 1) if api.compute.cpu else None
        worker.expose_errors = worker.expose_errors or expose_errors
        env = clean_env({**worker_env(worker, inherit=False), **declared})
        self.replica = Replica(
            worker,
            launch=launch_factory(api, root, self.policy, env),
            log_line=self._log_line,
        )
        await self.replica.start(api.serving.startup_timeout_s)

    def _log_line(self, line: str) -> None:
        # The actor's stderr is the replica's log in Ray; the control plane gets it too.
        print(f"[{self.api.name}] {line}", file=sys.stderr, flush=True)
        record = worker_record(line, self.replica_id)
        self.forwarder.add(self.api.name, {**record, "node": self.node_id})

    async def info(self) -> dict[str, Any]:
        """What the ingress needs to serve this API: the model's signature, explain, where."""
        return {
            "signature": self.replica.signature,
            "can_explain": self.replica.can_explain,
            "node_id": self.node_id,
            "pid": self.replica.pid,
            "sandboxed": self.policy.enabled,
        }

    async def run(self, frame: bytes, timeout: float) -> tuple[bytes, str]:
        """One batch (a frame from frames.batch_frame) -> (a reply frame, this node's id).

        A worker that is gone answers NOT_STARTED, for the ingress to queue the batch
        again: nothing of it ran."""
        requests, op = requests_from_frame(frame, self.api.name, self.api.version)
        try:
            outcomes: list[Any] = await self.replica.submit_batch(requests, timeout, op)
        except NotStarted:
            return NOT_STARTED, self.node_id
        except KilnError as exc:  # died running it (503) or overran (504)
            outcomes = [exc] * len(requests)
        return reply_frame(outcomes), self.node_id

    async def stream(self, frame: bytes) -> AsyncIterator[tuple[bytes, str] | dict[str, Any]]:
        """One streaming request (a one-item batch frame) -> its chunks, in order, as
        (bytes, content type); a handler error ends it with {"error": [type, message,
        status]}. Called with `handle.options(stream=True)`; cancelling the call stops
        the handler's generator (Replica.stream tells the worker)."""
        requests, _ = requests_from_frame(frame, self.api.name, self.api.version)
        try:
            async for data, content_type in self.replica.stream(requests[0]):
                yield bytes(data), content_type
        except KilnError as exc:
            error = wire_error(exc)
            yield {"error": [error.type, error.message, error.status]}

    def check_health(self) -> None:
        """Serve calls this every health_check_period_s; raising makes Serve replace us."""
        if self.replica.exited.is_set() or self.replica.doomed:
            raise RuntimeError(
                f"the Kiln worker of API '{self.api.name}' {self.replica.exit_reason or 'exited'}"
            )

    async def __del__(self) -> None:  # Serve's graceful shutdown calls it
        await asyncio.wait_for(self.replica.stop(grace=5.0), 10)
