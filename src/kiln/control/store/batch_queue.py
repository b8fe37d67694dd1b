"""The Batch API queue's delivery side: claim, acknowledge, fail, extend, dead-letter.

Split from `jobs.py` (job records, enqueuing, completion) along the hot path:
these are the calls every batch makes. See `jobs.py`'s docstring for the
visibility, lease and at-least-once rules they implement.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from . import schema as t
from .base import StoreBase
from .jobs import (
    _ACK_COUNT,
    _ACK_DELETE,
    _B,
    _J,
    _NEXT,
    _TAKE,
    _X,
    ACTIVE,
    Claim,
    DeadLetter,
    QueuedBatch,
    _token,
)


class QueueMixin(StoreBase):
    """Delivery of queued batches to workers."""

    # ---- delivery ---------------------------------------------------------------

    def claim_batch(self, job_id: str, *, at: float | None = None) -> Claim:
        """Hand the lowest visible batch to the caller under a fresh lease."""
        with self._write() as conn:
            return self._claim(conn, job_id, self._now(at))

    def ack_batch(
        self,
        job_id: str,
        batch: QueuedBatch,
        seconds: float,
        *,
        claim_next: bool = True,
        at: float | None = None,
    ) -> Claim | None:
        """The batch succeeded: count it once and (by default) claim the next one.

        Acknowledging and claiming share one transaction: one commit per batch is
        what keeps the queue's overhead under a couple of milliseconds.
        """
        now = self._now(at)
        with self._write() as conn:
            gone = conn.execute(
                _ACK_DELETE, {"j": job_id, "i": batch.idx, "l": batch.lease}
            ).rowcount
            if gone:
                conn.execute(_ACK_COUNT, {"j": job_id, "n": batch.item_count, "s": seconds})
            return self._claim(conn, job_id, now) if claim_next else None

    def fail_batch(
        self, job_id: str, batch: QueuedBatch, error: str, *, at: float | None = None
    ) -> bool:
        """The batch raised: redeliver it, or dead-letter it on its last allowed receive.

        Returns True when it was dead-lettered.
        """
        now = self._now(at)
        with self._write() as conn:
            row = conn.execute(
                sa.select(_B.receive_count, _J.max_receive_count)
                .join(t.batch_jobs, _J.id == _B.job_id)
                .where(_B.job_id == job_id, _B.idx == batch.idx, _B.lease == batch.lease)
            ).first()
            if row is None:  # our lease lapsed; the current holder decides
                return False
            if row.receive_count >= row.max_receive_count:
                self._dead_letter(conn, job_id, batch.idx, error, now)
                return True
            conn.execute(
                t.batch_batches.update()
                .where(_B.job_id == job_id, _B.idx == batch.idx)
                .values(visible_at=now, lease=None, last_error=error)
            )
            return False

    def extend_lease(
        self, job_id: str, batch: QueuedBatch, seconds: float, *, at: float | None = None
    ) -> bool:
        """Keep a batch invisible while it runs (the worker's heartbeat)."""
        with self._write() as conn:
            return bool(
                conn.execute(
                    t.batch_batches.update()
                    .where(_B.job_id == job_id, _B.idx == batch.idx, _B.lease == batch.lease)
                    .values(visible_at=self._now(at) + seconds)
                ).rowcount
            )

    def dead_letters(self, job_id: str, *, limit: int = 1000) -> list[DeadLetter]:
        with self._read() as conn:
            rows = conn.execute(
                sa.select(t.batch_dead_letters)
                .where(_X.job_id == job_id)
                .order_by(_X.idx)
                .limit(limit)
            )
            return [
                DeadLetter(
                    r.idx, r.item_start, r.item_count, r.payload, r.receive_count, r.error, r.at
                )
                for r in rows
            ]

    # ---- internals ----------------------------------------------------------------

    def _claim(self, conn: Connection, job_id: str, now: float) -> Claim:
        # A job's receive limit and timeout never change: read them once per process. Its
        # status is read only when no batch is visible: ending a job deletes its batches
        # in the same transaction, so a stopped job is never handed a batch.
        cache: dict[str, tuple[int, float]] = self.__dict__.setdefault("_job_consts", {})
        consts = cache.get(job_id)
        if consts is None:
            job = conn.execute(
                sa.select(_J.max_receive_count, _J.visibility_timeout).where(_J.id == job_id)
            ).first()
            if job is None:
                return Claim("stop")
            consts = cache[job_id] = (int(job.max_receive_count), float(job.visibility_timeout))
        max_receive_count, visibility_timeout = consts
        while True:
            row = conn.execute(_NEXT, {"j": job_id, "now": now}).first()
            if row is None:
                break
            if row.receive_count >= max_receive_count:
                held = "" if row.lease is None else " (its worker stopped while running it)"
                self._dead_letter(
                    conn,
                    job_id,
                    row.idx,
                    f"delivered {row.receive_count} times without finishing{held}; "
                    f"max_receive_count is {max_receive_count}",
                    now,
                )
                continue
            lease = _token()
            took = conn.execute(
                _TAKE,
                {
                    "j": job_id,
                    "i": row.idx,
                    "now": now,
                    "until": now + visibility_timeout,
                    "lease": lease,
                },
            ).rowcount
            if took:
                return Claim(
                    "batch",
                    QueuedBatch(
                        row.idx,
                        row.item_start,
                        row.item_count,
                        row.payload,
                        row.receive_count + 1,
                        lease,
                    ),
                )
        job = conn.execute(sa.select(_J.status, _J.enqueue_done).where(_J.id == job_id)).first()
        if job is None or job.status not in ACTIVE:
            return Claim("stop")
        if not job.enqueue_done:
            return Claim("wait")
        left = conn.execute(
            sa.select(sa.func.count()).select_from(t.batch_batches).where(_B.job_id == job_id)
        ).scalar()
        return Claim("wait" if left else "drained")

    def _dead_letter(self, conn: Connection, job_id: str, idx: int, error: str, now: float) -> None:
        row = conn.execute(
            sa.select(t.batch_batches).where(_B.job_id == job_id, _B.idx == idx)
        ).first()
        if row is None:
            return
        conn.execute(
            t.batch_dead_letters.insert().values(
                job_id=job_id,
                idx=idx,
                item_start=row.item_start,
                item_count=row.item_count,
                payload=row.payload,
                receive_count=row.receive_count,
                error=error,
                at=now,
            )
        )
        conn.execute(t.batch_batches.delete().where(_B.job_id == job_id, _B.idx == idx))
        conn.execute(
            t.batch_jobs.update()
            .where(_J.id == job_id)
            .values(failed=_J.failed + 1, failed_items=_J.failed_items + row.item_count)
        )
