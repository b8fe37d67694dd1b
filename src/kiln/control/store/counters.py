"""Durable counters: prediction-tracker buckets and usage metering.

Every increment is an upsert, `INSERT ... ON CONFLICT DO UPDATE SET count = count + n`,
inside one write transaction, so concurrent threads and processes never lose an
update, and a crash leaves each batch either wholly counted or not at all. Callers
that count on the hot path should aggregate in memory and flush a batch every second
or so (`add_usage_many`, one `add_class_counts` per flush): one transaction per
request would cap throughput at the database's commit rate.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from . import histogram
from . import schema as t
from .base import StoreBase
from .engine import insert
from .models import RegressionSummary, UsageIncrement, UsageRow

TRACKER_BUCKET_S = 60
"""Tracker time buckets are this long; windows are answered at this granularity."""
USAGE_PERIOD_S = 86_400
"""Usage is kept per UTC day; months and other periods are sums of days."""
LABEL_MAX = 255
_STATUS_CLASS = re.compile(r"^[1-5]xx$")


def status_class(status_code: int) -> str:
    """200 -> "2xx": the class usage is counted under."""
    return f"{status_code // 100}xx"


def bucket_start(at: float, size: int) -> int:
    return int(math.floor(at / size)) * size


def _add_counts(
    conn: Connection, table: sa.Table, rows: Sequence[dict[str, Any]], add: Sequence[str]
) -> None:
    """Upsert `rows`, adding the `add` columns onto existing rows' values."""
    if not rows:
        return
    stmt = insert(conn, table)
    keys = [c.name for c in table.primary_key.columns]
    stmt = stmt.on_conflict_do_update(
        index_elements=keys, set_={c: table.c[c] + stmt.excluded[c] for c in add}
    )
    # A fixed order of keys keeps concurrent PostgreSQL writers from deadlocking.
    conn.execute(stmt, sorted(rows, key=lambda r: tuple(r[k] for k in keys)))


def _window(column: sa.Column, since: float | None, until: float | None, size: int) -> list[Any]:
    clauses: list[Any] = []
    if since is not None:
        clauses.append(column >= bucket_start(since, size))
    if until is not None:
        clauses.append(column < until)
    return clauses


class CountersMixin(StoreBase):
    """Tracker and usage counters (see the module docstring for the concurrency story)."""

    # ---- prediction tracker: classification ------------------------------------

    def add_class_counts(
        self, api: str, counts: Mapping[str, int], *, version: str = "", at: float | None = None
    ) -> None:
        """Add per-class prediction counts to the bucket holding `at` (default: now).

        Labels longer than LABEL_MAX characters are truncated (they are model output).
        """
        start = bucket_start(self._now(at), TRACKER_BUCKET_S)
        merged: dict[str, int] = defaultdict(int)
        for label, n in counts.items():
            merged[str(label)[:LABEL_MAX]] += int(n)
        rows = [
            {"api": api, "version": version, "bucket_start": start, "label": label, "count": n}
            for label, n in merged.items()
            if n
        ]
        with self._write() as conn:
            _add_counts(conn, t.tracker_classes, rows, ["count"])

    def class_counts(
        self,
        api: str,
        *,
        version: str | None = None,
        since: float | None = None,
        until: float | None = None,
    ) -> dict[str, int]:
        """Per-class counts of `api` (one version, or all) over [since, until)."""
        c = t.tracker_classes.c
        query = (
            sa.select(c.label, sa.func.sum(c.count))
            .where(c.api == api, *_window(c.bucket_start, since, until, TRACKER_BUCKET_S))
            .group_by(c.label)
        )
        if version is not None:
            query = query.where(c.version == version)
        with self._read() as conn:
            return {label: int(n) for label, n in conn.execute(query)}

    # ---- prediction tracker: regression ----------------------------------------

    def add_regression_values(
        self, api: str, values: Iterable[float], *, version: str = "", at: float | None = None
    ) -> int:
        """Fold predicted values into the bucket holding `at`; returns how many were kept.

        NaN and infinities are dropped (they would poison the sums); the caller warns.
        """
        kept = [float(v) for v in values if math.isfinite(v)]
        if not kept:
            return 0
        key: dict[str, Any] = {"api": api, "version": version}
        key["bucket_start"] = bucket_start(self._now(at), TRACKER_BUCKET_S)
        stats = {
            **key,
            "count": len(kept),
            "min_value": min(kept),
            "max_value": max(kept),
            "sum_value": math.fsum(kept),
            "sum_squares": math.fsum(v * v for v in kept),
        }
        bins = [{**key, "bin": k, "count": n} for k, n in histogram.bin_counts(kept).items()]
        tv = t.tracker_values
        with self._write() as conn:
            stmt = insert(conn, tv).values(**stats)
            ex = stmt.excluded
            stmt = stmt.on_conflict_do_update(
                index_elements=["api", "version", "bucket_start"],
                set_={
                    "count": tv.c.count + ex.count,
                    "sum_value": tv.c.sum_value + ex.sum_value,
                    "sum_squares": tv.c.sum_squares + ex.sum_squares,
                    # CASE rather than MIN()/LEAST(): the spelling differs by dialect.
                    "min_value": sa.case(
                        (tv.c.min_value <= ex.min_value, tv.c.min_value), else_=ex.min_value
                    ),
                    "max_value": sa.case(
                        (tv.c.max_value >= ex.max_value, tv.c.max_value), else_=ex.max_value
                    ),
                },
            )
            conn.execute(stmt)
            _add_counts(conn, t.tracker_histogram, bins, ["count"])
        return len(kept)

    def regression_summary(
        self,
        api: str,
        *,
        version: str | None = None,
        since: float | None = None,
        until: float | None = None,
    ) -> RegressionSummary:
        """Count, min, max, sums and histogram of `api`'s values over [since, until)."""
        v, h = t.tracker_values.c, t.tracker_histogram.c
        stats = sa.select(
            sa.func.sum(v.count),
            sa.func.min(v.min_value),
            sa.func.max(v.max_value),
            sa.func.sum(v.sum_value),
            sa.func.sum(v.sum_squares),
        ).where(v.api == api, *_window(v.bucket_start, since, until, TRACKER_BUCKET_S))
        bins = (
            sa.select(h.bin, sa.func.sum(h.count))
            .where(h.api == api, *_window(h.bucket_start, since, until, TRACKER_BUCKET_S))
            .group_by(h.bin)
        )
        if version is not None:
            stats = stats.where(v.version == version)
            bins = bins.where(h.version == version)
        with self._read() as conn:
            count, low, high, total, squares = conn.execute(stats).one()
            hist = {int(k): int(n) for k, n in conn.execute(bins)}
        if not count:
            return RegressionSummary()
        return RegressionSummary(
            count=int(count),
            minimum=float(low),
            maximum=float(high),
            total=float(total),
            sum_squares=float(squares),
            bins=hist,
        )

    def prune_tracker(self, before: float) -> int:
        """Delete tracker buckets that start before `before`; returns rows deleted."""
        deleted = 0
        with self._write() as conn:
            for table in (t.tracker_classes, t.tracker_values, t.tracker_histogram):
                deleted += conn.execute(
                    table.delete().where(table.c.bucket_start < before)
                ).rowcount
        return deleted

    # ---- usage metering ----------------------------------------------------------

    def add_usage(
        self,
        api: str,
        status_class: str,
        count: int = 1,
        *,
        version: str = "",
        at: float | None = None,
    ) -> None:
        """Count `count` requests of `api` answered with `status_class` ("2xx"...)."""
        self.add_usage_many([UsageIncrement(api, status_class, count, version, at)])

    def add_usage_many(self, increments: Iterable[UsageIncrement]) -> None:
        """Apply a batch of usage increments in one transaction (all or nothing)."""
        merged: dict[tuple[str, str, int, str], int] = defaultdict(int)
        for inc in increments:
            if not _STATUS_CLASS.match(inc.status_class):
                raise ValueError(f"status class must look like '2xx', not {inc.status_class!r}")
            period = bucket_start(self._now(inc.at), USAGE_PERIOD_S)
            merged[(inc.api, inc.version, period, inc.status_class)] += int(inc.count)
        rows = [
            {"api": a, "version": v, "period_start": p, "status_class": s, "count": n}
            for (a, v, p, s), n in merged.items()
            if n
        ]
        with self._write() as conn:
            _add_counts(conn, t.usage_counts, rows, ["count"])

    def usage(
        self, *, api: str | None = None, since: float | None = None, until: float | None = None
    ) -> list[UsageRow]:
        """Per-day usage rows over [since, until) (whole UTC days), oldest first."""
        c = t.usage_counts.c
        query = sa.select(c.api, c.version, c.period_start, c.status_class, c.count).where(
            *_window(c.period_start, since, until, USAGE_PERIOD_S)
        )
        if api is not None:
            query = query.where(c.api == api)
        query = query.order_by(c.period_start, c.api, c.version, c.status_class)
        with self._read() as conn:
            return [UsageRow(a, v, int(p), s, int(n)) for a, v, p, s, n in conn.execute(query)]

    def usage_totals(
        self, api: str, *, since: float | None = None, until: float | None = None
    ) -> dict[str, int]:
        """Requests of `api` (all versions) by status class over [since, until)."""
        totals: dict[str, int] = defaultdict(int)
        for row in self.usage(api=api, since=since, until=until):
            totals[row.status_class] += row.count
        return dict(totals)
