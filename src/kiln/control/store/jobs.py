"""Batch jobs and their durable queue (issue 7): jobs, queued batches, dead letters.

The queue is three tables in the state store, so it survives a server restart and
every worker process reaches it directly (each opens its own Store).

- A batch row is *visible* when `visible_at <= now`. Claiming one sets
  `visible_at = now + visibility_timeout`, bumps `receive_count` and stamps a fresh
  `lease` token; only the holder of the current lease may acknowledge, fail or
  extend it. A worker that dies simply stops extending: the batch becomes visible
  again and is redelivered (at-least-once delivery, as with SQS).
- A claim that finds a batch already received `max_receive_count` times (its last
  holders all died) moves it to the dead-letter set instead of delivering it again;
  so does a failure reported on the last allowed receive.
- Acknowledging deletes the row and adds to the job's counters in the same
  transaction, so a batch is counted exactly once however often it was delivered.

Atomicity across processes: every read-modify-write runs in one `_write()`
transaction (BEGIN IMMEDIATE on SQLite; on PostgreSQL the claim reads with
`FOR UPDATE SKIP LOCKED` and the update re-checks visibility, so two workers never
hold the same lease). Statuses are short codes (see `kiln.batch.statuses`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from . import schema as t
from .base import StoreBase

_J, _B, _X = t.batch_jobs.c, t.batch_batches.c, t.batch_dead_letters.c
ACTIVE = ("enqueuing", "running")

# The hot path (claim, acknowledge) as statements built once: building a Core statement
# per call costs more than SQLite's commit does.
_P = sa.bindparam
_NEXT = (
    sa.select(_B.idx, _B.item_start, _B.item_count, _B.payload, _B.receive_count, _B.lease)
    .where(_B.job_id == _P("j"), _B.visible_at <= _P("now"))
    .order_by(_B.idx)
    .limit(1)
    .with_for_update(skip_locked=True)
)
_TAKE = (
    t.batch_batches.update()
    .where(_B.job_id == _P("j"), _B.idx == _P("i"), _B.visible_at <= _P("now"))
    .values(visible_at=_P("until"), receive_count=_B.receive_count + 1, lease=_P("lease"))
)
_ACK_DELETE = t.batch_batches.delete().where(
    _B.job_id == _P("j"), _B.idx == _P("i"), _B.lease == _P("l")
)
_ACK_COUNT = (
    t.batch_jobs.update()
    .where(_J.id == _P("j"))
    .values(
        succeeded=_J.succeeded + 1,
        succeeded_items=_J.succeeded_items + _P("n", type_=sa.BigInteger),
        batch_seconds=_J.batch_seconds + _P("s", type_=sa.Double),
    )
)


@dataclass(frozen=True)
class JobRow:
    """One job as stored."""

    id: str
    api: str
    status: str
    spec: str
    plan: str
    workers: int
    max_receive_count: int
    visibility_timeout: float
    timeout: float | None
    created_at: float
    started_at: float | None
    ended_at: float | None
    enqueued_batches: int
    enqueued_items: int
    enqueue_done: bool
    succeeded: int
    failed: int
    succeeded_items: int
    failed_items: int
    batch_seconds: float
    completion: str
    completion_lease: float | None
    error: str | None

    @property
    def active(self) -> bool:
        return self.status in ACTIVE


@dataclass(frozen=True)
class QueuedBatch:
    """A batch to enqueue, or one handed to a worker (with its lease)."""

    idx: int
    item_start: int
    item_count: int
    payload: bytes
    receive_count: int = 0
    lease: str = ""


@dataclass(frozen=True)
class DeadLetter:
    idx: int
    item_start: int
    item_count: int
    payload: bytes
    receive_count: int
    error: str
    at: float


@dataclass(frozen=True)
class Claim:
    """What a worker gets: a batch, or why there is none.

    `state`: "batch" (run it), "wait" (others hold the rest, or enqueuing goes on),
    "drained" (every batch is done: time for on_job_complete), "stop" (job ended).
    """

    state: str
    batch: QueuedBatch | None = None


def _token() -> str:
    return os.urandom(12).hex()


def _job(row: Any) -> JobRow:
    return JobRow(**{name: row._mapping[name] for name in JobRow.__dataclass_fields__})


class JobsMixin(StoreBase):
    """Jobs and the batch queue (see the module docstring for the delivery rules)."""

    # ---- jobs -----------------------------------------------------------------

    def create_job(
        self,
        job_id: str,
        api: str,
        *,
        spec: str,
        plan: str,
        workers: int,
        max_receive_count: int,
        visibility_timeout: float,
        timeout: float | None,
        at: float | None = None,
    ) -> JobRow:
        """Record a new job in status `enqueuing`."""
        values = dict(
            id=job_id,
            api=api,
            status="enqueuing",
            spec=spec,
            plan=plan,
            workers=workers,
            max_receive_count=max_receive_count,
            visibility_timeout=visibility_timeout,
            timeout=timeout,
            created_at=self._now(at),
            started_at=None,
            ended_at=None,
            enqueued_batches=0,
            enqueued_items=0,
            enqueue_done=False,
            succeeded=0,
            failed=0,
            succeeded_items=0,
            failed_items=0,
            batch_seconds=0.0,
            completion="pending",
            completion_lease=None,
            error=None,
        )
        with self._write() as conn:
            conn.execute(t.batch_jobs.insert().values(**values))
        return JobRow(**values)  # type: ignore[arg-type]

    def get_job(self, job_id: str) -> JobRow | None:
        with self._read() as conn:
            row = conn.execute(sa.select(t.batch_jobs).where(_J.id == job_id)).first()
        return _job(row) if row is not None else None

    def list_jobs(self, api: str | None = None, *, limit: int = 100) -> list[JobRow]:
        """Newest first."""
        query = sa.select(t.batch_jobs).order_by(_J.created_at.desc()).limit(limit)
        if api is not None:
            query = query.where(_J.api == api)
        with self._read() as conn:
            return [_job(r) for r in conn.execute(query)]

    def active_jobs(self, api: str | None = None) -> list[JobRow]:
        """Jobs still enqueuing or running (what a restarted server resumes)."""
        query = sa.select(t.batch_jobs).where(_J.status.in_(ACTIVE)).order_by(_J.created_at)
        if api is not None:
            query = query.where(_J.api == api)
        with self._read() as conn:
            return [_job(r) for r in conn.execute(query)]

    def end_job(
        self, job_id: str, status: str, *, error: str | None = None, at: float | None = None
    ) -> bool:
        """Move an active job to a final status and drop its queued batches.

        Returns False (and changes nothing) when the job had already ended: the first
        final status wins, so a stop racing a timeout or the last batch is harmless.
        """
        now = self._now(at)
        with self._write() as conn:
            done = conn.execute(
                t.batch_jobs.update()
                .where(_J.id == job_id, _J.status.in_(ACTIVE))
                .values(status=status, error=error, ended_at=now)
            ).rowcount
            if done:
                conn.execute(t.batch_batches.delete().where(_B.job_id == job_id))
        return bool(done)

    # ---- enqueuing ------------------------------------------------------------

    def enqueue(
        self, job_id: str, batches: Sequence[QueuedBatch], *, at: float | None = None
    ) -> bool:
        """Add batches and advance the job's enqueue cursor in one transaction.

        The cursor (`enqueued_batches`, `enqueued_items`) is what a restarted
        enqueuer resumes from. Returns False when the job is no longer enqueuing
        (stopped, timed out): the enqueuer then stops.
        """
        now = self._now(at)
        with self._write() as conn:
            status = conn.execute(sa.select(_J.status).where(_J.id == job_id)).scalar()
            if status != "enqueuing":
                return False
            if batches:
                conn.execute(
                    t.batch_batches.insert(),
                    [
                        dict(
                            job_id=job_id,
                            idx=b.idx,
                            item_start=b.item_start,
                            item_count=b.item_count,
                            payload=b.payload,
                            visible_at=now,
                            receive_count=0,
                            lease=None,
                            last_error=None,
                        )
                        for b in batches
                    ],
                )
                last = batches[-1]
                conn.execute(
                    t.batch_jobs.update()
                    .where(_J.id == job_id)
                    .values(
                        enqueued_batches=last.idx + 1,
                        enqueued_items=last.item_start + last.item_count,
                    )
                )
        return True

    def finish_enqueue(self, job_id: str, *, at: float | None = None) -> bool:
        """Every batch is queued: the job is `running` from now."""
        with self._write() as conn:
            return bool(
                conn.execute(
                    t.batch_jobs.update()
                    .where(_J.id == job_id, _J.status == "enqueuing")
                    .values(status="running", enqueue_done=True, started_at=self._now(at))
                ).rowcount
            )

    def release_leases(self, job_id: str, *, at: float | None = None) -> int:
        """Make every claimed batch visible now (a restarted server: its workers are gone)."""
        now = self._now(at)
        with self._write() as conn:
            released = conn.execute(
                t.batch_batches.update()
                .where(_B.job_id == job_id, _B.visible_at > now)
                .values(visible_at=now, lease=None)
            ).rowcount
            conn.execute(
                t.batch_jobs.update()
                .where(_J.id == job_id, _J.completion == "claimed")
                .values(completion_lease=now)
            )
        return int(released)

    def queue_counts(self, job_id: str, *, at: float | None = None) -> tuple[int, int]:
        """(batches waiting, batches held by a worker now)."""
        now = self._now(at)
        with self._read() as conn:
            rows = conn.execute(
                sa.select((_B.visible_at <= now).label("waiting"), sa.func.count())
                .where(_B.job_id == job_id)
                .group_by(sa.text("1"))
            ).all()
        counts = {bool(w): int(n) for w, n in rows}
        return counts.get(True, 0), counts.get(False, 0)

    # ---- on_job_complete ----------------------------------------------------------

    def claim_completion(self, job_id: str, lease_s: float, *, at: float | None = None) -> bool:
        """Win the right to run on_job_complete: once every batch is done, one caller wins.

        A winner that dies stops extending its lease; after it lapses another worker
        may win (so the hook runs once, unless a worker dies inside it).
        """
        now = self._now(at)
        with self._write() as conn:
            left = conn.execute(
                sa.select(sa.func.count()).select_from(t.batch_batches).where(_B.job_id == job_id)
            ).scalar()
            if left:
                return False
            return bool(
                conn.execute(
                    t.batch_jobs.update()
                    .where(
                        _J.id == job_id,
                        _J.status == "running",
                        _J.enqueue_done.is_(True),
                        sa.or_(
                            _J.completion == "pending",
                            sa.and_(_J.completion == "claimed", _J.completion_lease < now),
                        ),
                    )
                    .values(completion="claimed", completion_lease=now + lease_s)
                ).rowcount
            )

    def extend_completion(self, job_id: str, seconds: float, *, at: float | None = None) -> None:
        with self._write() as conn:
            conn.execute(
                t.batch_jobs.update()
                .where(_J.id == job_id, _J.completion == "claimed")
                .values(completion_lease=self._now(at) + seconds)
            )

    def finish_job(
        self, job_id: str, *, error: str | None = None, at: float | None = None
    ) -> str | None:
        """on_job_complete ran (or failed, with `error`): set the job's final status.

        `succeeded` when no batch failed, `completed_with_failures` otherwise, and
        `worker_error` when the hook itself failed. Returns the status set, or None
        when the job had already ended (stopped or timed out meanwhile).
        """
        now = self._now(at)
        with self._write() as conn:
            failed = conn.execute(
                sa.select(_J.failed).where(_J.id == job_id, _J.status == "running")
            ).scalar()
            if failed is None:
                return None
            status = (
                "worker_error" if error else "completed_with_failures" if failed else "succeeded"
            )
            conn.execute(
                t.batch_jobs.update()
                .where(_J.id == job_id)
                .values(completion="done", status=status, ended_at=now, error=error)
            )
            return status
