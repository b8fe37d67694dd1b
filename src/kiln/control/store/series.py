"""Per-API per-minute aggregates (issue 18's charts) and the console's audit log.

Why in the store: Prometheus counters keep no history, and the console's charts
and `GET /apis/{name}/timeseries` must show the last 24 hours across restarts.
Counts are upserts that add (`count = count + n`), so a flush every few seconds
adds to the current minute's row; replicas is the last sample, queue the largest
sample of the minute. Latency is counted per histogram bucket *index*: which
bounds the indices stand for is the caller's (control/timeseries.py).
Size stays bounded because `prune_minutes` deletes rows older than the retention.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from . import schema as t
from .base import StoreBase
from .counters import _add_counts
from .engine import insert

MINUTE_S = 60
_M, _L, _AUD = t.api_minutes.c, t.api_minute_latency.c, t.audit_log.c


@dataclass
class MinuteDelta:
    """What one flush adds to one API's minute."""

    api: str
    minute: int  # epoch seconds, a multiple of 60
    classes: dict[str, int] = field(default_factory=dict)  # "2xx" -> n
    latency: dict[int, int] = field(default_factory=dict)  # bucket index -> n
    replicas: int | None = None
    queue: int | None = None


@dataclass
class MinuteRow:
    """One stored minute of one API."""

    minute: int
    classes: dict[str, int]
    latency: dict[int, int]
    replicas: int | None
    queue: int | None


@dataclass
class AuditEntry:
    at: float
    user: str | None
    key_id: str | None
    action: str
    target: str
    status: int


class SeriesMixin(StoreBase):
    """`api_minutes`, `api_minute_latency` and `audit_log`."""

    def add_minutes(self, deltas: Iterable[MinuteDelta]) -> None:
        """Add one flush's deltas, in one transaction."""
        rows: list[dict[str, Any]] = []
        latency: list[dict[str, Any]] = []
        gauges: list[MinuteDelta] = []
        for d in deltas:
            if d.minute % MINUTE_S:
                raise ValueError(f"minute must be a multiple of {MINUTE_S}, not {d.minute}")
            rows.append(
                {
                    "api": d.api,
                    "minute": d.minute,
                    "c2xx": d.classes.get("2xx", 0),
                    "c4xx": d.classes.get("4xx", 0),
                    "c5xx": d.classes.get("5xx", 0),
                }
            )
            latency += [
                {"api": d.api, "minute": d.minute, "bucket": b, "count": n}
                for b, n in d.latency.items()
                if n
            ]
            if d.replicas is not None or d.queue is not None:
                gauges.append(d)
        if not rows:
            return
        with self._write() as conn:
            _add_counts(conn, t.api_minutes, rows, ("c2xx", "c4xx", "c5xx"))
            _add_counts(conn, t.api_minute_latency, latency, ("count",))
            for d in gauges:  # few: one per API and flush
                values: dict[str, Any] = {}
                if d.replicas is not None:
                    values["replicas"] = d.replicas
                if d.queue is not None:
                    values["queue"] = sa.case(
                        (sa.or_(_M.queue.is_(None), _M.queue < d.queue), d.queue), else_=_M.queue
                    )
                conn.execute(
                    t.api_minutes.update()
                    .where(_M.api == d.api, _M.minute == d.minute)
                    .values(**values)
                )

    def minutes(self, api: str, since: float, until: float | None = None) -> list[MinuteRow]:
        """The stored minutes of `api` starting in [since, until), oldest first."""
        start = int(since // MINUTE_S) * MINUTE_S
        where = [_M.api == api, _M.minute >= start]
        lat_where = [_L.api == api, _L.minute >= start]
        if until is not None:
            where.append(_M.minute < until)
            lat_where.append(_L.minute < until)
        with self._read() as conn:
            found = conn.execute(sa.select(t.api_minutes).where(*where).order_by(_M.minute))
            out = {
                r.minute: MinuteRow(
                    r.minute, {"2xx": r.c2xx, "4xx": r.c4xx, "5xx": r.c5xx}, {}, r.replicas, r.queue
                )
                for r in found
            }
            for r in conn.execute(sa.select(t.api_minute_latency).where(*lat_where)):
                row = out.get(r.minute)
                if row is not None:
                    row.latency[r.bucket] = r._mapping["count"]
        return list(out.values())

    def prune_minutes(self, before: float) -> int:
        """Delete minutes starting before `before`; returns how many API-minutes went."""
        with self._write() as conn:
            gone = conn.execute(t.api_minutes.delete().where(_M.minute < before)).rowcount
            conn.execute(t.api_minute_latency.delete().where(_L.minute < before))
        return int(gone or 0)

    def count_minutes(self) -> int:
        with self._read() as conn:
            found = conn.execute(sa.select(sa.func.count()).select_from(t.api_minutes))
            return int(found.scalar() or 0)

    # ---- audit log --------------------------------------------------------------------
    def add_audit(self, entry: AuditEntry, *, keep: int = 10_000) -> None:
        """Record one change; the log keeps the newest `keep` entries."""
        with self._write() as conn:
            conn.execute(
                insert(conn, t.audit_log).values(
                    at=entry.at,
                    user_name=entry.user,
                    key_id=entry.key_id,
                    action=entry.action,
                    target=entry.target[:255],
                    status=entry.status,
                )
            )
            cutoff = conn.execute(
                sa.select(_AUD.id).order_by(_AUD.id.desc()).offset(keep).limit(1)
            ).scalar()
            if cutoff is not None:
                conn.execute(t.audit_log.delete().where(_AUD.id <= cutoff))

    def audit_entries(self, limit: int = 200) -> list[AuditEntry]:
        """The newest entries first."""
        with self._read() as conn:
            rows = conn.execute(sa.select(t.audit_log).order_by(_AUD.id.desc()).limit(limit))
            return [
                AuditEntry(r.at, r.user_name, r.key_id, r.action, r.target, r.status) for r in rows
            ]


def percentile_bucket(latency: Mapping[int, int], q: float) -> int | None:
    """The bucket index the q-th percentile (0..100) falls in; None with no counts."""
    total = sum(latency.values())
    if total <= 0:
        return None
    rank = total * q / 100
    seen = 0
    for bucket in sorted(latency):
        seen += latency[bucket]
        if seen >= rank:
            return bucket
    return max(latency)
