"""Batch API job workers on Ray: one actor per worker, spread over the cluster's nodes.

Each `BatchWorkerActor` does on its node what `kiln.batch.job.JobRun` does for one
worker slot on one machine, through the same function (`start_linked_worker`):

- it starts a real Kiln batch worker, ``python -m kiln.batch.worker FD``, from the
  same `LaunchSpec`/`SandboxPolicy` as locally (`spawn_worker`): a clean base
  environment plus the API's own ``env:``/``.env`` (any ``RAY_*`` key dropped), the
  sandbox where the node has bubblewrap, no store URL, no network;
- it serves that worker's channel itself with a `QueueLink` over its own `Store`
  (the shared PostgreSQL URL): claim / ack (+ claim) / fail / complete / finish,
  with the same leases, redeliveries, dead letters and on_job_complete-once rules,
  so the control plane need not be reachable from the worker's node;
- a remote output (s3://, gs://) is written by the link from the bytes the worker
  sends with each acknowledgement, as on one machine (the actor's environment,
  given by `run_job_workers(env=...)`, holds the storage credentials; the worker's
  never does).

A worker that crashes is restarted in place (with backoff, up to
``jobs.max_worker_restarts``); one that cannot load its predictor ends the job in
``worker error``. An actor that dies takes its worker with it (parent-death
signal): the link's lease extensions stop and the batch it held is redelivered to
another worker after the visibility timeout. An actor lost with its node (or its
process killed) is restarted by Ray on a live node, up to
``jobs.max_worker_restarts`` times, and its `run` is retried there, so the job
keeps its number of workers and a job whose workers all ran on the lost node
still finishes; `ray.kill` (`JobWorkers.cancel`) ends an actor for good.

Not here yet (the control plane's part, `JobRun` locally): enqueuing, the job's
``timeout`` and ``compute.mem`` watchdogs, and stopping the actors when a job is
stopped (a stopped job answers every claim "stop", so the workers exit by themselves;
`JobWorkers.cancel` kills them at once).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import ray

from kiln.backends.ray.replica import api_from_args, clean_env, sandbox_policy, spec_args
from kiln.batch import statuses as st
from kiln.batch.output import OutputSink
from kiln.batch.worker import EXIT_LOAD_FAILED, EXIT_OOM, MARK
from kiln.batch.workers import start_linked_worker, worker_job
from kiln.config import load_project
from kiln.control.store import Store

KEEP_LINES = 20_000  # the worker output an actor keeps for `lines()` (its log is stderr)


@ray.remote
class BatchWorkerActor:
    """Worker `number` of one job: a Kiln batch worker subprocess and its queue link."""

    def __init__(
        self,
        store_url: str,
        job_id: str,
        project_dir: str,
        api_name: str,
        number: int,
        config_file: str | None = None,
        sandbox: str = "auto",
        spec: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        """From a project folder on the node, or, with `spec` (a control plane's, with
        the worker's declared `env`), from the runtime_env working_dir it runs in."""
        if spec is not None:
            api, root = api_from_args(spec, os.getcwd()), Path(os.getcwd())
            declared = dict(env or {})
        else:
            project = load_project(project_dir, config_file)
            found = project.batch_api(api_name)
            if found is None:
                raise ValueError(f"batch API '{api_name}' is not in {project_dir}")
            api, root, declared = found, Path(project.root), dict(project.worker_env(found))
        self.api, self.root, self.number = api, root, number
        self.rebase = spec is not None  # the job's frozen paths are the control plane's
        self.job_id = job_id
        self.node_id: str = ray.get_runtime_context().get_node_id()
        self.policy = sandbox_policy(sandbox)
        self.store = Store(store_url)
        self.env = clean_env(declared)
        self.output: collections.deque[str] = collections.deque(maxlen=KEEP_LINES)
        self.restarts = 0
        self.printed = 0
        self.error: str | None = None
        self._proc: Any = None
        self._link: Any = None
        self._ending = False

    async def node(self) -> str:
        return self.node_id

    async def lines(self) -> list[str]:
        """The worker's output so far (state markers excluded), newest last."""
        return list(self.output)

    async def lines_after(self, seen: int) -> tuple[list[str], int]:
        """The lines after the first `seen` this worker printed, and how many it has now
        printed (a control plane's job log follows the worker with it)."""
        new = min(self.printed - seen, len(self.output))
        return (list(self.output)[-new:] if new > 0 else []), self.printed

    async def run(self) -> dict[str, Any]:
        """Keep the worker running until it finishes; what happened, with this node's id."""
        job = await asyncio.to_thread(self.store.get_job, self.job_id)
        if job is None:
            raise ValueError(f"no job '{self.job_id}' in the state store")
        if self.rebase:
            job = rebased(job, str(self.root))
        hello = worker_job(job)
        output = hello["output"]
        sink = OutputSink(output["folder"], output["format"]) if output else None
        if sink is not None and not sink.remote:
            Path(sink.folder).mkdir(parents=True, exist_ok=True)
        backoff, code = 0.2, None
        while not self._ending:
            self._proc, self._link = await start_linked_worker(
                self.store,
                job,
                hello,
                self.root,
                self.number,
                sink=sink,
                sandbox=self.policy,
                env=self.env,
                network=getattr(self.api, "network", None) or "none",
                mem_limit=self.api.compute.mem,
                log_line=self._line,
                log=self._line,
            )
            try:
                code = await self._proc.wait()
                await self._proc.drain_output()
            finally:
                self._link.close()
            if code == 0 or self._ending:
                break
            if code in (EXIT_LOAD_FAILED, EXIT_OOM):
                status = st.WORKER_OOM if code == EXIT_OOM else st.WORKER_ERROR
                reason = self.error or f"worker {self.number} exit code {code}"
                await asyncio.to_thread(self.store.end_job, self.job_id, status, error=reason)
                break
            self.restarts += 1
            if self.restarts > self.api.jobs.max_worker_restarts:
                break
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 10.0)
        return {
            "node_id": self.node_id,
            "number": self.number,
            "exit_code": code,
            "restarts": self.restarts,
            # Ray restarted this actor (its node or process was lost) before this run.
            "reconstructed": ray.get_runtime_context().was_current_actor_reconstructed,
            "error": self.error,
        }

    async def stop(self, grace: float = 3.0) -> None:
        """Close the channel (the worker's stop message); kill what is left after `grace`."""
        self._ending = True
        if self._link is not None:
            self._link.close()
        if self._proc is not None and self._proc.returncode is None:
            await self._proc.stop(grace)

    def _line(self, text: str) -> None:
        if text.startswith(MARK):
            state, _, detail = text[len(MARK) :].partition(" ")
            if state == "error":
                self.error = detail
            return
        self.output.append(text)
        self.printed += 1
        # The actor's stderr is where Ray keeps its log (`kiln logs` merges them later).
        print(f"[{self.api.name} job {self.job_id} worker {self.number}] {text}", file=sys.stderr)


def rebased(job: Any, root: str) -> Any:
    """The job with its frozen plan's paths moved from the control plane's project folder
    to `root` (this node's runtime_env working_dir); environments built for the control
    plane's machine are dropped (on Ray, requirements come as the runtime_env's pip)."""
    plan = orjson.loads(job.plan) if job.plan else {}
    old = str(plan.get("root") or "").rstrip("/")
    if not old:
        return job
    plan = orjson.loads(orjson.dumps(plan).replace(old.encode(), root.rstrip("/").encode()))
    plan["site_dirs"] = [d for d in plan.get("site_dirs") or [] if os.path.isdir(d)]
    if isinstance(plan.get("worker_spec"), dict):
        plan["worker_spec"]["site_dirs"] = plan["site_dirs"]
    return dataclasses.replace(job, plan=orjson.dumps(plan).decode())


@dataclass
class JobWorkers:
    """The actors running one job's workers: wait for them, read them, or cancel them."""

    job_id: str
    actors: list[Any]
    runs: list[Any] = field(default_factory=list)  # one ObjectRef per actor's `run`

    def nodes(self, timeout: float = 30.0) -> list[str]:
        """The node each actor runs on, in worker order."""
        return list(ray.get([a.node.remote() for a in self.actors], timeout=timeout))

    def wait(self, timeout: float) -> list[dict[str, Any]]:
        """Every actor's outcome once all have ended (a killed actor's: its error)."""
        ready, pending = ray.wait(self.runs, num_returns=len(self.runs), timeout=timeout)
        if pending:
            raise TimeoutError(
                f"{len(pending)} of job {self.job_id}'s {len(self.runs)} Ray workers "
                f"still running after {timeout:g}s"
            )
        outcomes = []
        for ref in self.runs:
            try:
                outcomes.append(ray.get(ref))
            except ray.exceptions.RayError as exc:  # killed, or its node died
                outcomes.append({"error": f"{type(exc).__name__}: {exc}".splitlines()[0]})
        return outcomes

    def cancel(self, grace: float = 3.0) -> None:
        """Stop every worker (channel closed, then killed) and the actors themselves."""
        stops = [a.stop.remote(grace) for a in self.actors]
        deadline = time.monotonic() + grace + 5
        ray.wait(stops, num_returns=len(stops), timeout=max(0.0, deadline - time.monotonic()))
        for actor in self.actors:
            ray.kill(actor)


def run_job_workers(
    store_url: str,
    job_id: str,
    project_dir: str,
    api: str,
    workers: int,
    *,
    config_file: str | None = None,
    sandbox: str = "auto",
    env: dict[str, str] | None = None,
    num_cpus: float | None = None,
    spec: Any = None,
    runtime_env: dict[str, Any] | None = None,
    worker_env: dict[str, str] | None = None,
) -> JobWorkers:
    """Start `workers` actors for an enqueued job, spread over the nodes (SPREAD).

    The job must be in the store at `store_url` and enqueued (``running``): the
    workers claim from its queue at once. `env` is the actors' environment (storage
    credentials for the links' output writes), never the workers'. `num_cpus`
    defaults to the API's ``compute.cpu`` (1 when unset).

    An actor lost with its node is restarted elsewhere and its `run` retried (up to
    ``jobs.max_worker_restarts``): without that, a lost node would leave the job
    short of workers, or with none at all when they all ran there.
    """
    sent: dict[str, Any] | None = None
    if spec is not None:  # a control plane's: the project travels as `runtime_env`
        sent = spec_args(spec, project_dir)
    else:
        project = load_project(project_dir, config_file)
        spec = project.batch_api(api)
        if spec is None:
            raise ValueError(f"batch API '{api}' is not in {project_dir}")
    cpus = num_cpus if num_cpus is not None else (spec.compute.cpu or 1)
    options: dict[str, Any] = {
        "scheduling_strategy": "SPREAD",
        "num_cpus": cpus,
        "max_restarts": spec.jobs.max_worker_restarts,
        "max_task_retries": -1,  # `run` goes on in the restarted actor (bounded by the above)
    }
    if spec.compute.mem:
        options["memory"] = spec.compute.mem
    if env or runtime_env:
        options["runtime_env"] = {**(runtime_env or {}), "env_vars": dict(env or {})}
    actors = [
        BatchWorkerActor.options(**options).remote(  # type: ignore[attr-defined]
            store_url,
            job_id,
            "." if sent is not None else str(project_dir),
            api,
            n,
            config_file,
            sandbox,
            spec=sent,
            env=worker_env,
        )
        for n in range(workers)
    ]
    handles = JobWorkers(job_id, actors)
    handles.runs = [a.run.remote() for a in actors]
    return handles
