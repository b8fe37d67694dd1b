"""One running job, in the server: its enqueuer, its worker processes and its watchdog.

- The enqueuer (a thread) streams the source into the queue a few hundred batches
  per transaction, advancing the job's cursor with them, and logs its progress.
  On success the job becomes ``running``; on a source error it ends
  ``failed while enqueuing`` with the reason.
- Then ``workers`` worker processes start (`spawn_worker`: ``python -m
  kiln.batch.worker FD``), each in a slot that restarts it with backoff when it
  crashes (its batch is redelivered after the visibility timeout), up to
  ``jobs.max_worker_restarts``. A worker has no store: it reaches the queue over
  a socketpair whose server end is a `QueueLink` thread (``kiln.batch.link``),
  which answers with the store's calls and keeps the worker's leases alive. A
  local output folder is created here before the workers start; a remote output
  is written by the links.
  A predictor that cannot load ends the job in ``worker error``; a worker over
  ``compute.mem`` (or raising MemoryError) in ``out of memory``.
- The watchdog polls the job's row: ``timeout`` ends it ``timed out``; any final
  status (set by a worker, a stop or the watchdog) stops the workers that remain.

Workers die with the server (parent-death signal). A server that stops leaves its
jobs active in the store, and the next server resumes them (`JobManager.register`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from kiln.batch import statuses as st
from kiln.batch.joblog import JobLog
from kiln.batch.link import QueueLink
from kiln.batch.output import OutputSink
from kiln.batch.sources import iter_batches
from kiln.batch.spec import JobSpec, Limits
from kiln.batch.worker import EXIT_LOAD_FAILED, EXIT_OOM, MARK
from kiln.batch.workers import (
    start_linked_worker,
    worker_job,
)
from kiln.control.store import Store
from kiln.control.store.jobs import JobRow, QueuedBatch
from kiln.errors import KilnError
from kiln.sandbox.policy import SandboxPolicy
from kiln.serving.process import WorkerProcess

ENQUEUE_CHUNK = 512  # batches per transaction
ENQUEUE_CHUNK_BYTES = 4 << 20
PROGRESS_EVERY_S = 1.0
WATCH_S = 0.25
STOP_GRACE_S = 3.0


# What the server knows and a worker must not: the state store's URL (it may hold a password).
class JobRun:
    """Drives one job from enqueuing to its final status."""

    def __init__(
        self,
        store: Store,
        job: JobRow,
        root: Path,
        limits: Limits,
        log: JobLog,
        *,
        max_restarts: int = 5,
        mem_limit: int | None = None,
        on_end: Callable[[JobRow | None], None] | None = None,
        env: dict[str, str] | None = None,
        sandbox: SandboxPolicy | None = None,
        network: str = "none",
        placer: Any = None,
        spec: Any = None,
    ) -> None:
        self.store = store
        # Where the workers run when not here: a backend's `start_job_workers` (Ray),
        # given the Batch API's `spec`; None: local worker processes in slots.
        self.placer = placer
        self.spec = spec
        self._remote: Any = None
        self.sandbox = sandbox or SandboxPolicy(enabled=False, inherit_env=True)
        self.network = network
        self.env = dict(env or {})  # the deployment's variables for every worker
        self.job = job
        self.root = root
        self.limits = limits
        self.log = log
        self.max_restarts = max_restarts
        self.mem_limit = mem_limit
        self.on_end = on_end
        self.states: dict[int, str] = {}
        self.procs: dict[int, WorkerProcess] = {}
        self._errors: dict[int, str] = {}  # the last error marker of each worker
        self.links: dict[int, QueueLink] = {}
        self._worker_job: dict[str, Any] = {}
        self._sink: OutputSink | None = None
        self.failures = 0
        self.ending = False
        self._wake = asyncio.Event()
        self._slots: list[asyncio.Task[None]] = []

    # ---- what the status document reads -------------------------------------------

    def worker_counts(self) -> dict[str, int]:
        counts = {k: 0 for k in ("pending", "initializing", "running", "succeeded", "stalled")}
        for state in self.states.values():
            if state in counts:
                counts[state] += 1
        counts["failed"] = self.failures
        return counts

    def wake(self) -> None:
        """Look at the job now (after a stop), rather than at the next poll."""
        self._wake.set()

    # ---- the job's life -----------------------------------------------------------

    async def run(self) -> None:
        watcher = asyncio.create_task(self._watch())
        try:
            if not self.job.enqueue_done:
                await asyncio.to_thread(self._enqueue)
            job = await asyncio.to_thread(self.store.get_job, self.job.id)
            if job is not None and job.status == st.RUNNING and await self._prepare(job):
                self.job = job
                placed = self.placer is not None and await self._place(job)
                if not placed:
                    self.log.write(f"starting {job.workers} worker(s)", event="workers")
                    self._slots = [asyncio.create_task(self._slot(n)) for n in range(job.workers)]
            await watcher
        finally:
            watcher.cancel()
            await self._stop_workers()
            final = await asyncio.to_thread(self.store.get_job, self.job.id)
            if final is not None and not final.active:
                self.log.write(
                    f"job {st.display(final.status)}" + (f": {final.error}" if final.error else ""),
                    event="status",
                    status=final.status,
                )
            self.log.close()
            if self.on_end is not None:
                self.on_end(final)

    async def _end(self, status: str, error: str) -> None:
        """End the job with `status` and why (the store refuses to end an ended one)."""
        await asyncio.to_thread(self.store.end_job, self.job.id, status, error=error)

    async def _place(self, job: JobRow) -> bool:
        """The workers where the backend runs them (True), or False: here, in slots.

        Remote workers reach the queue through the store, not through this server."""
        where = self.placer.name
        try:
            self._remote = await self.placer.start_job_workers(job, self.spec, self.root, self.env)
            if self._remote is None:
                return False
            self.log.write(f"starting {job.workers} worker(s) on {where}", event="workers")
            nodes = await self._remote.nodes()
        except Exception as exc:  # noqa: BLE001 - the cluster says why in many ways
            await self._end(st.WORKER_ERROR, f"could not start the job's workers on {where}: {exc}")
            return True
        for n in range(job.workers):
            self.states[n] = "running"
        self.log.write(
            f"{job.workers} worker(s) running on {where} node(s) {', '.join(sorted(set(nodes)))}",
            event="workers",
        )
        return True

    async def _pull_remote(self) -> bool:
        """The remote workers' new output into the job log; False once all have ended."""
        for n, text in await self._remote.new_lines():
            self.log.write(text, event="worker", worker=n)
        return not await self._remote.done()

    async def _prepare(self, job: JobRow) -> bool:
        """What the workers get: the job, and its output folder (created here when local)."""
        self._worker_job = worker_job(job)
        output = self._worker_job["output"]
        if output is None:
            return True
        self._sink = OutputSink(output["folder"], output["format"])
        if self._sink.remote:
            return True
        if self.placer is not None and not self.placer.local_outputs:  # workers elsewhere
            await self._end(
                st.WORKER_ERROR,
                f"on the {self.placer.name} backend a job's output "
                f"must be shared storage: give output.path as s3://BUCKET/PREFIX/ or "
                f"gs://BUCKET/PREFIX/ (a local folder would be on each worker's own node)",
            )
            return False
        try:
            await asyncio.to_thread(Path(self._sink.folder).mkdir, parents=True, exist_ok=True)
        except OSError as exc:
            await self._end(
                st.WORKER_ERROR,
                f"cannot create the output folder {self._sink.folder}: {exc.strerror or exc}",
            )
            return False
        return True

    def _enqueue(self) -> None:
        """Stream the source into the queue (runs in a thread)."""
        job = self.job
        spec = JobSpec.from_json(orjson.loads(job.spec))
        start = job.enqueued_batches
        verb = "resuming enqueuing at batch" if start else "enqueuing"
        self.log.write(f"{verb} {start or ''}".strip() + f" ({spec.source})", event="enqueue")
        chunk: list[QueuedBatch] = []
        size = 0
        batches, items = start, job.enqueued_items
        last = time.monotonic()
        try:
            for batch in iter_batches(spec, self.root, self.limits, start):
                chunk.append(batch)
                size += len(batch.payload)
                if len(chunk) >= ENQUEUE_CHUNK or size >= ENQUEUE_CHUNK_BYTES:
                    if not self.store.enqueue(job.id, chunk):
                        return  # stopped or timed out meanwhile
                    batches, items = batch.idx + 1, batch.item_start + batch.item_count
                    chunk, size = [], 0
                    if time.monotonic() - last >= PROGRESS_EVERY_S:
                        last = time.monotonic()
                        self.log.write(
                            f"enqueued {batches} batches ({items} items)", event="enqueue"
                        )
            if chunk:
                if not self.store.enqueue(job.id, chunk):
                    return
                batches = chunk[-1].idx + 1
                items = chunk[-1].item_start + chunk[-1].item_count
        except KilnError as exc:
            self.store.end_job(job.id, st.ENQUEUE_FAILED, error=exc.message)
            return
        except Exception as exc:  # noqa: BLE001 - a source may fail in many ways
            self.store.end_job(job.id, st.ENQUEUE_FAILED, error=f"{type(exc).__name__}: {exc}")
            return
        if self.store.finish_enqueue(job.id):
            self.log.write(f"enqueuing complete: {batches} batches, {items} items", event="enqueue")

    async def _watch(self) -> None:
        while True:
            job = await asyncio.to_thread(self.store.get_job, self.job.id)
            if job is None or not job.active:
                self.log.flush()  # the job's last lines are readable as soon as it ends
                return
            if job.timeout is not None and time.time() > job.created_at + job.timeout:
                await self._end(
                    st.TIMED_OUT, f"the job ran longer than its timeout of {job.timeout:g}s"
                )
                return
            if self.mem_limit:
                await self._check_memory(job)
            ended = self._slots and all(t.done() for t in self._slots)
            if self._remote is not None and not await self._pull_remote():
                ended = True
            if ended:
                await self._end(st.WORKER_ERROR, "every worker exited but the job had not finished")
                return
            self.log.flush()
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), WATCH_S)

    async def _check_memory(self, job: JobRow) -> None:
        for n, proc in list(self.procs.items()):
            why = proc.over_memory(self.mem_limit)
            if why is not None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await self._end(st.WORKER_OOM, f"worker {n} {why}")
                return

    async def _slot(self, n: int) -> None:
        """Keep worker `n` running until it finishes, or give up on the job."""
        backoff = 0.2
        while not self.ending:
            self.states[n] = "pending"
            proc, link = await self._start_worker(n)
            self.procs[n] = proc
            try:
                code = await proc.wait()
                await proc.drain_output()
            finally:
                link.close()
            error = self._errors.pop(n, None)
            if proc.oom_killed():
                code = EXIT_OOM
                error = error or f"worker {n} ran out of memory (compute.mem)"
            self.procs.pop(n, None)
            self.links.pop(n, None)
            if self.ending:
                return
            if code == 0:
                self.states[n] = "succeeded"
                return
            self.states[n] = "failed"
            if code in (EXIT_LOAD_FAILED, EXIT_OOM):
                status = st.WORKER_OOM if code == EXIT_OOM else st.WORKER_ERROR
                await self._end(status, error or f"exit code {code}")
                self.wake()
                return
            self.failures += 1
            how = f"signal {-code}" if code < 0 else f"exit code {code}"
            if self.failures > self.max_restarts:
                await self._end(
                    st.WORKER_ERROR,
                    f"workers crashed {self.failures} times (last: worker {n}, {how}); "
                    f"jobs.max_worker_restarts is {self.max_restarts}",
                )
                self.wake()
                return
            self.log.write(
                f"worker {n} stopped ({how}); restarting it in {backoff:.1f}s, its batch will "
                f"be redelivered",
                event="worker",
                worker=n,
            )
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 10.0)

    async def _start_worker(self, n: int) -> tuple[WorkerProcess, QueueLink]:
        """Worker `n` and the thread that answers its channel."""
        proc, link = await start_linked_worker(
            self.store,
            self.job,
            self._worker_job,
            self.root,
            n,
            sink=self._sink,
            sandbox=self.sandbox,
            env=self.env,
            network=self.network,
            mem_limit=self.mem_limit,
            log_line=self._line_handler(n),
            log=lambda line: self.log.write(line, event="worker", worker=n),
        )
        self.links[n] = link
        return proc, link

    def _line_handler(self, n: int) -> Callable[[str], None]:
        """Worker `n`'s output into the job log; its state markers into `states`."""

        def line(text: str) -> None:
            if text.startswith(MARK):
                state, _, detail = text[len(MARK) :].partition(" ")
                if state == "error":
                    self._errors[n] = detail
                    self.log.write(detail, event="worker", worker=n)
                elif state in ("initializing", "running"):
                    self.states[n] = state
                return
            self.log.write(text, event="worker", worker=n)

        return line

    async def _stop_workers(self) -> None:
        self.ending = True
        if self._remote is not None:
            with contextlib.suppress(Exception):
                await self._remote.new_lines()  # the last lines before they go
            await self._remote.cancel()
        for link in list(self.links.values()):
            link.close()
        # A closed channel is the stop message (workers ignore SIGTERM): an idle worker
        # exits at once, one inside user code when it next reaches the queue, and what is
        # left after STOP_GRACE_S is killed.
        live = [p for p in self.procs.values() if p.returncode is None]
        await asyncio.gather(*(p.stop(STOP_GRACE_S) for p in live), return_exceptions=True)
        for task in self._slots:
            task.cancel()
        await asyncio.gather(*self._slots, return_exceptions=True)
