"""The batch worker process: claim a batch, run it, acknowledge it; repeat; then finish.

Started by the server for one job as ``python -m kiln.batch.worker STORE_URL JOB_ID``.
It reaches the queue in the state store directly (its own Store), so the server
is not in the data path. A heartbeat thread keeps the claimed batch invisible
while it runs; if this process dies, the heartbeat stops and the batch is
redelivered after the API's visibility timeout. When no batch is left, one worker
wins the right to run ``on_job_complete`` (see `JobsMixin.claim_completion`) and
sets the job's final status.

Exit codes tell the server what happened: 0 done, 2 the predictor failed to load
(the job ends in ``worker error``), 3 out of memory (``out of memory``).
State changes go to stdout as marker lines the server reads (``MARK`` + state).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import traceback
from typing import Any

import orjson

from kiln.batch.output import OutputSink
from kiln.batch.runner import Runner, load_runner
from kiln.control.store import Store
from kiln.control.store.jobs import QueuedBatch
from kiln.errors import KilnError
from kiln.serving.worker import _die_with_parent

MARK = "\x1ekiln-batch:"
EXIT_LOAD_FAILED = 2
EXIT_OOM = 3
_WAIT_S = (0.02, 0.5)  # polling backoff while others hold the last batches


def mark(state: str, detail: str = "") -> None:
    sys.stdout.write(f"{MARK}{state} {detail}".rstrip() + "\n")
    sys.stdout.flush()


def describe(exc: BaseException) -> str:
    if isinstance(exc, KilnError):
        return exc.message
    return f"{type(exc).__name__}: {exc}"


class Heartbeat(threading.Thread):
    """Extends the lease of whatever this worker holds, every third of the timeout."""

    def __init__(self, store: Store, job_id: str, timeout: float) -> None:
        super().__init__(daemon=True, name="lease-heartbeat")
        self.store, self.job_id, self.timeout = store, job_id, timeout
        self.batch: QueuedBatch | None = None
        self.completion = False
        self._stop = threading.Event()

    def run(self) -> None:
        while not self._stop.wait(self.timeout / 3):
            try:
                batch = self.batch
                if batch is not None:
                    self.store.extend_lease(self.job_id, batch, self.timeout)
                elif self.completion:
                    self.store.extend_completion(self.job_id, self.timeout)
            except Exception:  # noqa: BLE001 - a missed beat only risks a redelivery
                pass

    def stop(self) -> None:
        self._stop.set()


class BatchWorker:
    def __init__(self, store: Store, job_id: str) -> None:
        self.store = store
        self.job_id = job_id
        job = store.get_job(job_id)
        if job is None:
            raise KilnError(f"job {job_id} is not in the state store")
        self.job = job
        self.spec: dict[str, Any] = orjson.loads(job.spec)
        self.plan: dict[str, Any] = orjson.loads(job.plan)
        output = self.spec.get("output")
        self.sink = OutputSink(output["path"], output["format"], job_id) if output else None
        self.heartbeat = Heartbeat(store, job_id, job.visibility_timeout)
        self.runner: Runner | None = None

    def job_spec(self) -> dict[str, Any]:
        """What Cortex hands a predictor: the submission plus id, counts and times."""
        raw = {k: v for k, v in self.spec["raw"].items() if k != "item_list"}
        return {
            **raw,
            "job_id": self.job_id,
            "api_name": self.job.api,
            "kind": "BatchAPI",
            "workers": self.job.workers,
            "config": self.spec["config"],
            "total_batch_count": self.job.enqueued_batches,
            "start_time": self.job.started_at,
            "created_time": self.job.created_at,
        }

    def load(self) -> None:
        self.runner = load_runner(self.plan, self.job_spec(), self.spec["batch_size"])

    def run(self) -> int:
        self.heartbeat.start()
        claim = self.store.claim_batch(self.job_id)
        pause = _WAIT_S[0]
        while True:
            if claim is not None and claim.state == "batch" and claim.batch is not None:
                claim = self._run_batch(claim.batch)
                pause = _WAIT_S[0]
                continue
            state = claim.state if claim is not None else "wait"
            if state == "stop":
                return 0
            if state == "drained" and self._complete():
                return 0
            time.sleep(pause)
            pause = min(pause * 2, _WAIT_S[1])
            claim = self.store.claim_batch(self.job_id)

    def _run_batch(self, batch: QueuedBatch) -> Any:
        assert self.runner is not None
        self.heartbeat.batch = batch
        started = time.perf_counter()
        try:
            items = orjson.loads(batch.payload)
            results = self.runner.run(items, str(batch.idx))
            if self.sink is not None:
                if results is None or len(results) != len(items):
                    got = "nothing" if results is None else f"{len(results)} results"
                    raise KilnError(
                        f"the job has an output, so predict must return a list with one "
                        f"result per item ({len(items)}); it returned {got}"
                    )
                self.sink.write(batch.idx, batch.item_start, results)
        except MemoryError:
            raise
        except BaseException as exc:  # noqa: BLE001 - user code may raise anything
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise
            error = describe(exc)
            if not isinstance(exc, KilnError):
                trace = "".join(traceback.format_exception(exc))
                sys.stderr.write(
                    f"batch {batch.idx} failed (receive {batch.receive_count}):\n{trace}"
                )
                sys.stderr.flush()
            else:
                sys.stderr.write(f"batch {batch.idx} failed: {error}\n")
            self.heartbeat.batch = None
            dead = self.store.fail_batch(self.job_id, batch, error)
            if dead:
                sys.stderr.write(f"batch {batch.idx} moved to the dead-letter set\n")
            return self.store.claim_batch(self.job_id)
        self.heartbeat.batch = None
        return self.store.ack_batch(self.job_id, batch, time.perf_counter() - started)

    def _complete(self) -> bool:
        """Try to run on_job_complete; True when the job is finished (by us or another)."""
        if not self.store.claim_completion(self.job_id, self.job.visibility_timeout):
            job = self.store.get_job(self.job_id)
            return job is None or not job.active or job.completion == "done"
        assert self.runner is not None
        self.heartbeat.completion = True
        error = None
        try:
            self.runner.on_job_complete()
        except Exception as exc:  # noqa: BLE001 - user code
            traceback.print_exc()
            error = f"on_job_complete failed: {describe(exc)}"
        self.heartbeat.completion = False
        status = self.store.finish_job(self.job_id, error=error)
        mark("finished", status or "")
        return True


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    _die_with_parent()
    if os.getppid() == 1:  # the server died before we asked to die with it
        return 1
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the server decides
    url, job_id = argv[0], argv[1]
    mark("initializing")
    try:
        store = Store(url)
        worker = BatchWorker(store, job_id)
        worker.load()
    except MemoryError:
        mark("error", "out of memory while loading the predictor")
        return EXIT_OOM
    except BaseException as exc:  # noqa: BLE001 - loading user code may raise anything
        if not isinstance(exc, KilnError):
            traceback.print_exc()
        mark("error", f"the predictor failed to load: {describe(exc)}")
        return EXIT_LOAD_FAILED
    mark("running")
    try:
        return worker.run()
    except MemoryError:
        mark("error", "out of memory while running a batch")
        return EXIT_OOM
    finally:
        worker.heartbeat.stop()
        store.close()


if __name__ == "__main__":
    sys.exit(main())
