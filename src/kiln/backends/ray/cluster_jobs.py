"""A Batch API job's workers placed on Ray by `kiln server --backend ray`.

The control plane keeps its part of a job (`kiln.batch.job.JobRun`: enqueuing,
the timeout watchdog, the job log, stop); only the workers move: one
`BatchWorkerActor` each (batch.py), spread over the nodes, claiming from the
job's queue in the shared PostgreSQL store. The project reaches the nodes as the
actors' runtime_env working_dir, as an API revision's does.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from kiln.backends.ray.batch import JobWorkers, run_job_workers
from kiln.backends.ray.project_env import project_runtime_env

# What a remote output write needs on the node (the links write with the server's
# credentials, as on one machine; never the worker's environment).
STORAGE_ENV_PREFIXES = ("AWS_", "GOOGLE_", "GCS_", "FSSPEC_")


def storage_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(STORAGE_ENV_PREFIXES)}


class RemoteJobWorkers:
    """What `JobRun` asks of a job's remote workers, without blocking its event loop."""

    def __init__(self, workers: JobWorkers) -> None:
        self.workers = workers
        self._seen = [0] * len(workers.actors)

    async def nodes(self) -> list[str]:
        return await asyncio.to_thread(self.workers.nodes)

    async def done(self) -> bool:
        import ray

        runs = self.workers.runs
        ready, _ = await asyncio.to_thread(ray.wait, runs, num_returns=len(runs), timeout=0)
        return len(ready) == len(runs)

    async def new_lines(self) -> list[tuple[int, str]]:
        """Each worker's output since the last call, as (worker number, line)."""
        import ray

        pairs = zip(self.workers.actors, self._seen, strict=True)
        calls = [actor.lines_after.remote(seen) for actor, seen in pairs]
        out: list[tuple[int, str]] = []
        for n, call in enumerate(calls):
            try:
                lines, printed = await call
            except ray.exceptions.RayError:  # a lost actor: Ray restarts it elsewhere
                continue
            if printed < self._seen[n]:  # restarted: it counts from zero again
                self._seen[n] = 0
            self._seen[n] = printed
            out.extend((n, line) for line in lines)
        return out

    async def cancel(self) -> None:
        await asyncio.to_thread(self.workers.cancel)


async def start_job_workers(
    store_url: str, job: Any, spec: Any, root: Path, env: dict[str, str], sandbox: str
) -> RemoteJobWorkers:
    """`job.workers` actors for an enqueued job (`JobRun` calls this through the backend)."""
    runtime_env = await asyncio.to_thread(project_runtime_env, root)
    workers = await asyncio.to_thread(
        run_job_workers,
        store_url,
        job.id,
        str(root),
        spec.name,
        job.workers,
        sandbox=sandbox,
        env=storage_env(),
        spec=spec,
        runtime_env=runtime_env,
        worker_env=env,
    )
    return RemoteJobWorkers(workers)
