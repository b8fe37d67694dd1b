"""The server's Batch APIs and their jobs: what the HTTP routes (inference and management) call.

`register(api, root, revision)` makes a ``kind: BatchAPI`` reachable on its
endpoint and resumes its unfinished jobs (a restarted server, or a redeploy);
`unregister(name)` stops its jobs. Submissions are validated here (400s naming
the key or limit), recorded in the store, and handed to a `JobRun`. Everything
blocking goes through `asyncio.to_thread`: the event loop serves predictions.
"""

from __future__ import annotations

import asyncio
import functools
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from kiln.batch import statuses as st
from kiln.batch.job import JobRun
from kiln.batch.joblog import JobLog, job_log_path
from kiln.batch.report import job_spec_document, job_status, job_summary
from kiln.batch.sources import SourceError, check_paths, dry_run
from kiln.batch.spec import Limits, output_folder, parse_body, validate
from kiln.batch.workers import worker_plan
from kiln.control.store import Store
from kiln.control.store.jobs import JobRow
from kiln.errors import Forbidden, InvalidInput, NotFound
from kiln.sandbox.policy import SandboxPolicy


@dataclass
class BatchApiEntry:
    spec: Any  # kiln.config.BatchApiSpec
    root: Path
    revision: str | None  # None: `kiln serve DIR`'s own project, not a deployment
    limits: Limits


def _limits(api: Any) -> Limits:
    jobs = api.jobs
    return Limits(
        max_batch_bytes=jobs.max_batch_bytes,
        max_request_bytes=jobs.max_request_bytes,
        max_workers=jobs.max_workers,
        max_receive_count=jobs.max_receive_count,
    )


def new_job_id() -> str:
    """Time-ordered and unique: 11 hex digits of milliseconds, 5 random ones."""
    return f"{int(time.time() * 1000):011x}{os.urandom(3).hex()[:5]}"


class JobManager:
    """Every batch API of one server, and the jobs running for them."""

    def __init__(
        self,
        store: Store,
        log_folder: Path,
        api_log: Any = None,
        *,
        jobs_folder: Path | None = None,
    ) -> None:
        self.store = store
        self.log_folder = log_folder
        # Deployed APIs' local outputs: KILN_HOME/jobs/<api>/<job_id>/<output.path>.
        self.jobs_folder = jobs_folder if jobs_folder is not None else log_folder.parent / "jobs"
        self.api_log = api_log  # LogSink: one line per job event in the API's own log
        # How workers start (the server sets its own; without one: unsandboxed, as before).
        self.sandbox = SandboxPolicy(enabled=False, inherit_env=True)
        # A backend that runs job workers elsewhere (`kiln server --backend ray`); None: here.
        self.placer: Any = None
        # The server's AsyncAPI manager (kiln.control.asyncs), carried here so the inference
        # app reaches it the way it reaches Batch APIs; None: no AsyncAPI routes.
        self.asyncs: Any = None
        self.apis: dict[str, BatchApiEntry] = {}
        self.endpoints: dict[str, str] = {}
        self.runs: dict[str, JobRun] = {}
        self._resuming: set[str] = set()  # jobs a `_resume` is between its check and start
        self._tasks: set[asyncio.Task[None]] = set()

    # ---- batch APIs ---------------------------------------------------------------

    def register(self, api: Any, project_root: Path, revision: str | None = None) -> None:
        """Serve `api` (a BatchApiSpec) and resume its unfinished jobs (needs a running loop)."""
        self.apis[api.name] = BatchApiEntry(api, Path(project_root), revision, _limits(api))
        self.endpoints = {e.spec.endpoint: name for name, e in self.apis.items()}
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return
        self._spawn(self._resume(api.name))

    async def unregister(self, name: str) -> list[str]:
        """Stop serving `name`; its active jobs end ``stopped``. Returns their ids."""
        stopped = []
        for job in await asyncio.to_thread(self.store.active_jobs, name):
            await self._stop(job.id, "the batch API was deleted")
            stopped.append(job.id)
        self.apis.pop(name, None)
        self.endpoints = {e.spec.endpoint: n for n, e in self.apis.items()}
        return stopped

    def match(self, path: str) -> tuple[str, str | None] | None:
        """(api name, job id or None) when `path` is a batch API's endpoint or a job under it."""
        name = self.endpoints.get(path)
        if name is not None:
            return name, None
        head, _, tail = path.rstrip("/").rpartition("/")
        name = self.endpoints.get(head)
        if name is not None and tail:
            return name, tail
        name = self.endpoints.get(path.rstrip("/"))
        return (name, None) if name is not None else None

    def limits(self, name: str) -> Limits:
        return self._entry(name).limits

    def _entry(self, name: str) -> BatchApiEntry:
        entry = self.apis.get(name)
        if entry is None:
            raise NotFound(f"no batch API named '{name}'; it is not in kiln.yaml or not deployed")
        return entry

    # ---- jobs ---------------------------------------------------------------------

    async def submit(
        self, name: str, body: bytes, *, dry: bool = False, allow_local: bool = True
    ) -> dict[str, Any]:
        """Validate and record a job, start enqueuing it in the background; the job spec.

        `allow_local` is False for a caller who is not the server's admin (API keys on):
        local source paths would let them read or list any file the server can. A local
        `output.path` is allowed: it is relative and lands in the job's own folder.
        """
        entry = self._entry(name)
        spec = validate(parse_body(body, entry.limits), entry.limits, dict(entry.spec.config))
        if not allow_local:
            local = [p for p in spec.paths if p and "://" not in p]
            if local:
                raise Forbidden(
                    f"local paths ({local[0]!r}) are for the server's admin; read your data "
                    f"through s3:// or gs:// instead"
                )
        if entry.spec.runtime != "predictor" and spec.output is None and not dry:
            raise InvalidInput(
                f"batch API '{name}' runs its {entry.spec.runtime} model without a predictor, "
                f"so its results can only go to an output sink; add "
                f'"output": {{"path": "results/", "format": "jsonl"}} to the job'
            )
        if spec.paths:
            await asyncio.to_thread(check_paths, spec, entry.root)
        if dry:
            try:
                return await asyncio.to_thread(dry_run, spec, entry.root)
            except SourceError as exc:
                raise InvalidInput(exc.message) from None
        job_id = new_job_id()
        if spec.output is not None:
            spec.output["folder"] = output_folder(
                spec.output["path"],
                job_id,
                name,
                project=entry.root if entry.revision is None else None,
                jobs_home=self.jobs_folder,
            )
        job = await asyncio.to_thread(
            self.store.create_job,
            job_id,
            name,
            spec=orjson.dumps(spec.to_json()).decode(),
            plan=orjson.dumps(worker_plan(entry.spec, entry.root, entry.revision)).decode(),
            workers=spec.workers,
            max_receive_count=spec.max_receive_count,
            visibility_timeout=entry.spec.jobs.visibility_timeout,
            timeout=spec.timeout,
        )
        self._event(
            name, job.id, f"job {job.id} submitted: {spec.workers} worker(s), {spec.source}"
        )
        self._start(entry, job)
        return job_spec_document(job, entry.spec.endpoint)

    async def get(self, name: str, job_id: str) -> dict[str, Any]:
        entry = self._entry(name)
        job = await self._job(name, job_id)
        queued = await asyncio.to_thread(self.store.queue_counts, job_id)
        run = self.runs.get(job_id)
        return job_status(
            job,
            endpoint=entry.spec.endpoint,
            api_spec=entry.spec.model_dump(mode="json", exclude_none=True),
            worker_counts=run.worker_counts() if run is not None else None,
            queued=queued,
        )

    async def list(self, name: str, limit: int = 100) -> dict[str, Any]:
        entry = self._entry(name)
        jobs = await asyncio.to_thread(self.store.list_jobs, name, limit=limit)
        return {
            "api_name": name,
            "endpoint": entry.spec.endpoint,
            "jobs": [job_summary(j) for j in jobs],
        }

    async def stop(self, name: str, job_id: str) -> dict[str, str]:
        job = await self._job(name, job_id)
        if job.active:
            await self._stop(job_id, "stopped by request")
        return {"message": f"stopped job {job_id}"}

    async def failed(self, name: str, job_id: str) -> dict[str, Any]:
        """The job's dead-lettered batches, each with its error and items."""
        await self._job(name, job_id)
        letters = await asyncio.to_thread(self.store.dead_letters, job_id)
        return {
            "job_id": job_id,
            "failed_batches": [
                {
                    "batch_id": str(d.idx),
                    "first_item": d.item_start,
                    "item_count": d.item_count,
                    "receive_count": d.receive_count,
                    "error": d.error,
                    "items": orjson.loads(d.payload),
                }
                for d in letters
            ],
        }

    def log_path(self, name: str, job_id: str) -> Path:
        return job_log_path(self.log_folder, name, job_id)

    async def job_exists(self, name: str, job_id: str) -> bool:
        job = await asyncio.to_thread(self.store.get_job, job_id)
        return job is not None and job.api == name

    async def close(self) -> None:
        """Server shutdown: stop workers, leave jobs active so the next server resumes them."""
        for run in list(self.runs.values()):
            run.ending = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # ---- internals ------------------------------------------------------------------

    async def _job(self, name: str, job_id: str) -> JobRow:
        job = await asyncio.to_thread(self.store.get_job, job_id)
        if job is None or job.api != name:
            raise NotFound(f"batch API '{name}' has no job '{job_id}'; `kiln jobs list {name}`")
        return job

    async def _stop(self, job_id: str, why: str) -> None:
        await asyncio.to_thread(self.store.end_job, job_id, st.STOPPED, error=why)
        run = self.runs.get(job_id)
        if run is not None:
            run.wake()

    async def _resume(self, name: str) -> None:
        entry = self.apis.get(name)
        if entry is None:
            return
        for job in await asyncio.to_thread(self.store.active_jobs, name):
            # Two redeploys, or a submit whose row is committed but not yet started, may
            # race here: a job is claimed before the await and started at most once.
            if job.id in self.runs or job.id in self._resuming:
                continue
            self._resuming.add(job.id)
            try:
                released = await asyncio.to_thread(self.store.release_leases, job.id)
                if job.id in self.runs:
                    continue
                self._event(
                    name,
                    job.id,
                    f"resuming job {job.id} ({st.display(job.status)}; "
                    f"{released} batch(es) in flight redelivered)",
                )
                self._start(entry, job)
            finally:
                self._resuming.discard(job.id)

    def _start(self, entry: BatchApiEntry, job: JobRow) -> None:
        if job.id in self.runs:  # already running: a job has one run at a time
            return
        log = JobLog(self.log_folder, job.api, job.id)
        run = JobRun(
            self.store,
            job,
            entry.root,
            entry.limits,
            log,
            max_restarts=entry.spec.jobs.max_worker_restarts,
            mem_limit=entry.spec.compute.mem,
            on_end=functools.partial(self._ended, job.id),
            env=getattr(entry.spec, "worker_env", None),  # env: over .env (kiln.config)
            sandbox=self.sandbox,
            network=getattr(entry.spec, "network", None) or "none",
            placer=self.placer,
            spec=entry.spec,
        )
        self.runs[job.id] = run
        self._spawn(run.run())

    def _ended(self, job_id: str, final: JobRow | None) -> None:
        self.runs.pop(job_id, None)
        if final is not None and not final.active:
            message = f"job {job_id} {st.display(final.status)}"
            self._event(final.api, job_id, message + (f": {final.error}" if final.error else ""))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _event(self, api: str, job_id: str, message: str) -> None:
        if self.api_log is not None:
            self.api_log.write(api, {"event": "job", "job_id": job_id, "message": message})
