"""How a batch worker starts and what it is told: the one place for it, whoever hosts it.

`spawn_worker` starts `python -m kiln.batch.worker FD` from a LaunchSpec, as realtime
workers start (serving/process.py); `start_linked_worker` pairs it with the
`QueueLink` thread that answers its queue operations against the state store;
`worker_job` is what the worker is told first, `worker_plan` how a BatchAPI's
workers run (frozen into the job, so a resumed job runs the same), and
`readable_paths` what a sandboxed worker may read besides its revision. The local
`JobRun` (job.py) and the Ray backend's actors (kiln.backends.ray.batch) both use
them, so the protocol and the sandbox rules are written once.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from kiln.batch.link import QueueLink
from kiln.batch.output import OutputSink, job_output_folder
from kiln.batch.spec import resolve_local
from kiln.control.store import Store
from kiln.control.store.jobs import JobRow
from kiln.sandbox.identity import tenant_of
from kiln.sandbox.policy import SandboxPolicy, base_env
from kiln.sandbox.spec import Limits as SandboxLimits
from kiln.serving.process import WorkerProcess

SERVER_ONLY_ENV = ("KILN_STATE_URL",)


@dataclass(frozen=True)
class WorkerLaunch:
    """Everything needed to start one batch worker (what a sandbox launcher is told)."""

    job_id: str
    api: str
    number: int  # the worker's slot, 0 .. workers - 1
    root: Path  # the revision's folder: the worker's cwd, read only
    fd: int  # the worker's end of its channel: the one descriptor it inherits
    output_folder: str | None  # a local output folder it writes into; None: none, or remote
    # What the deployment declares (`api.worker_env`: env: over .env), never the server's.
    env: dict[str, str] = field(default_factory=dict)
    read_only: tuple[str, ...] = ()  # besides the revision: its Python environment, models
    network: str = "none"
    mem_limit: int | None = None


def spawn_worker(
    launch: WorkerLaunch, sandbox: SandboxPolicy, log_line: Callable[[str], None]
) -> WorkerProcess:
    """One batch worker process, started the way realtime workers are (serving/process.py).

    Only `launch.fd` passes; the environment is the minimal base plus the
    deployment's variables (a `kiln serve` without --sandbox keeps the
    developer's, minus the store's URL); in the sandbox the worker sees its
    revision, its Python environment and its job's output folder (writable),
    and nothing else. `log_line` gets every line of its output.
    """
    if sandbox.inherit_env:
        env = {k: v for k, v in os.environ.items() if k not in SERVER_ONLY_ENV}
    else:
        env = base_env()
    env.update(launch.env)
    env.update(PYTHONUNBUFFERED="1", KILN_BATCH_WORKER=str(launch.number))
    argv = [sys.executable, "-m", "kiln.batch.worker", str(launch.fd)]
    spec = sandbox.launch(
        argv,
        env,
        cwd=str(launch.root),
        pass_fds=(launch.fd,),
        tenant=tenant_of(launch.api),
        read_only=list(launch.read_only),
        writable=[launch.output_folder] if launch.output_folder else [],
        network=launch.network,
        limits=SandboxLimits(mem_bytes=launch.mem_limit),
        name=f"{launch.api}-job-{launch.number}",
    )
    return WorkerProcess(spec, log_line)


def worker_job(job: JobRow) -> dict[str, Any]:
    """What a worker is told first over its channel: the job, as it needs it."""
    spec = orjson.loads(job.spec)
    raw = {k: v for k, v in spec["raw"].items() if k != "item_list"}
    job_spec = {  # what Cortex hands a predictor: the submission plus id, counts and times
        **raw,
        "job_id": job.id,
        "api_name": job.api,
        "kind": "BatchAPI",
        "workers": job.workers,
        "config": spec["config"],
        "total_batch_count": job.enqueued_batches,
        "start_time": job.started_at,
        "created_time": job.created_at,
    }
    output = spec.get("output")
    return {
        "job_spec": job_spec,
        "plan": orjson.loads(job.plan),
        "batch_size": spec["batch_size"],
        "output": {"folder": job_output_folder(job.id, output), "format": output["format"]}
        if output
        else None,
    }


async def start_linked_worker(
    store: Store,
    job: JobRow,
    hello: dict[str, Any],
    root: Path,
    n: int,
    *,
    sink: OutputSink | None,
    sandbox: SandboxPolicy,
    env: dict[str, str],
    network: str,
    mem_limit: int | None,
    log_line: Callable[[str], None],
    log: Callable[[str], None],
) -> tuple[WorkerProcess, QueueLink]:
    """Batch worker `n` of `job`, started, and its started `QueueLink` over `store`.

    The one place a worker and its link are paired, whoever hosts them: the local
    `JobRun`, or a Ray actor (kiln.backends.ray.batch) that opens the store itself
    so the control plane need not be reachable from its node. `hello` is
    `worker_job(job)`; `log_line` gets the worker's output, `log` the link's errors.
    """
    ours, theirs = socket.socketpair()
    try:
        launch = WorkerLaunch(
            job_id=job.id,
            api=job.api,
            number=n,
            root=root,
            fd=theirs.fileno(),
            output_folder=sink.folder if sink is not None and not sink.remote else None,
            env=env,
            read_only=readable_paths(job, root),
            network=network,
            mem_limit=mem_limit,
        )
        proc = spawn_worker(launch, sandbox, log_line)
        await proc.spawn()
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()  # the worker's copy is the only one: its exit closes the channel
    link = QueueLink(
        store,
        job.id,
        hello,
        ours,
        job.visibility_timeout,
        sink=sink,
        log=log,
        name=f"batch-link-{job.id}-{n}",
    )
    link.start()
    return proc, link


def readable_paths(job: JobRow, root: Path) -> tuple[str, ...]:
    """What a sandboxed worker reads besides its revision: its environment, its model."""
    plan = orjson.loads(job.plan) if job.plan else {}
    paths = list(plan.get("site_dirs") or [])
    # file_path_lister hands the predictor local file paths (the admin's only: users'
    # jobs may not name local sources), so their folders are readable too.
    spec = orjson.loads(job.spec) if job.spec else {}
    if spec.get("source") == "file_path_lister":
        for path in spec.get("paths") or []:
            if "://" not in path or path.startswith("file://"):
                local = resolve_local(path, root)
                paths.append(local if os.path.isdir(local) else os.path.dirname(local))
    model = (plan.get("worker_spec") or {}).get("model_path")
    if model and os.path.isabs(model):
        paths.append(model if os.path.isdir(model) else os.path.dirname(model))
    return tuple(paths)


def worker_plan(api: Any, root: Path, revision: str | None) -> dict[str, Any]:
    """How workers run this BatchAPI, frozen into the job (so a resumed job runs the same)."""
    from kiln.environments import site_dirs_for

    plan: dict[str, Any] = {
        "root": str(root),
        "python_path": api.python_path or str(root),
        "revision": revision,
        "mem": api.compute.mem,
        "site_dirs": site_dirs_for(root),  # built by the deploy (kiln.environments)
    }
    if api.runtime == "predictor":
        plan.update(kind="predictor", predictor_path=api.predictor.path)
        return plan
    from kiln.serving.placement import worker_spec_for

    spec = worker_spec_for(api)
    spec.site_dirs = plan["site_dirs"]
    plan.update(kind="pipeline", worker_spec=spec.to_wire())
    return plan
