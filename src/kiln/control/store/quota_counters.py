"""Shared monthly quota counters: admission decided by the store, for many ingress processes.

One row per (subject, month): `subject` is "user:<name>" or "key:<id>", `used` the
calls admitted this month. `take_quota` checks and counts one call for several
subjects in ONE write transaction: for each subject, in a fixed order,
`UPDATE ... SET used = used + 1 WHERE used < limit RETURNING used`; when any
subject is at its limit, the transaction rolls back and nothing is counted. The
condition is evaluated by the database on the row it locks (PostgreSQL re-checks
it after waiting for a concurrent writer; SQLite's BEGIN IMMEDIATE serialises
writers), so N processes racing for the last call of a quota get exactly one
admission between them. The fixed order keeps two transactions that lock the same
user and key rows from deadlocking.

A row is created on a subject's first call of a month, seeded with that month's
metered calls in `key_usage` (what a local `kiln server` on the same store counted),
so switching a store from local admission to shared admission never grants a
month's quota twice.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from . import schema as t
from .base import StoreBase
from .counters import USAGE_PERIOD_S, bucket_start
from .engine import insert

_Q, _KU = t.quota_counters.c, t.key_usage.c


class _Refused(Exception):
    """A subject is at its limit: raised inside the transaction so it rolls back."""


def _metered(conn: Connection, subject: str, period_start: int) -> int:
    """Calls metered in `key_usage` for a subject since the month's start."""
    kind, _, name = subject.partition(":")
    column = _KU.user_name if kind == "user" else _KU.key_id
    since = bucket_start(period_start, USAGE_PERIOD_S)
    query = sa.select(sa.func.coalesce(sa.func.sum(_KU.count), 0)).where(
        column == name, _KU.period_start >= since
    )
    return int(conn.execute(query).scalar() or 0)


class QuotaCountersMixin(StoreBase):
    """The shared admission counters (see the module docstring)."""

    def take_quota(
        self, period_start: int, subjects: Sequence[tuple[str, int | None]]
    ) -> tuple[bool, dict[str, int]]:
        """Count one call for every subject (name, limit or None for no bound), or none.

        Returns (admitted, used per subject): after counting when admitted; when
        refused, the subjects' counts as they stand, a subject at its limit included.
        """
        ordered = sorted(subjects)
        try:
            used = self._take(period_start, ordered)
        except _Refused:
            return False, self.quota_used(period_start, [s for s, _ in ordered])
        return True, used

    def _take(self, period_start: int, ordered: list[tuple[str, int | None]]) -> dict[str, int]:
        used: dict[str, int] = {}
        with self._write() as conn:
            existing = {
                row.subject
                for row in conn.execute(
                    sa.select(_Q.subject).where(
                        _Q.period_start == period_start,
                        _Q.subject.in_([s for s, _ in ordered]),
                    )
                )
            }
            for subject, _limit in ordered:
                if subject not in existing:
                    seed = _metered(conn, subject, period_start)
                    stmt = insert(conn, t.quota_counters).values(
                        subject=subject, period_start=period_start, used=seed
                    )
                    conn.execute(stmt.on_conflict_do_nothing())
            for subject, limit in ordered:
                where = [_Q.subject == subject, _Q.period_start == period_start]
                if limit is not None:
                    where.append(_Q.used < limit)
                row = conn.execute(
                    t.quota_counters.update()
                    .where(*where)
                    .values(used=_Q.used + 1)
                    .returning(_Q.used)
                ).first()
                if row is None:  # at its limit: roll back what this call counted
                    raise _Refused(subject)
                used[subject] = int(row.used)
        return used

    def quota_used(self, period_start: int, subjects: Sequence[str]) -> dict[str, int]:
        """The shared counters of `subjects` for the month (0 where none was counted)."""
        with self._read() as conn:
            rows = conn.execute(
                sa.select(_Q.subject, _Q.used).where(
                    _Q.period_start == period_start, _Q.subject.in_(list(subjects))
                )
            )
            found = {subject: int(n) for subject, n in rows}
        return {s: found.get(s, 0) for s in subjects}

    def prune_quota_counters(self, before: int) -> int:
        """Delete counters of months that started before `before`; returns rows deleted."""
        with self._write() as conn:
            return conn.execute(t.quota_counters.delete().where(_Q.period_start < before)).rowcount
