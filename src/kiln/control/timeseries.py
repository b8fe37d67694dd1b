"""Per-API per-minute history for charts: `GET /apis/{name}/timeseries` and the console.

Why not Prometheus: its counters keep no history, and a single `kiln server`
has no Prometheus beside it. `Metrics.request` calls `observe` for every answer
(a dict update under an uncontended lock); `run` flushes the deltas to the
state store every `FLUSH_S` seconds together with a sample of each API's ready
replicas and queue length, and prunes minutes older than `RETAIN_S` once a
minute, so the store holds at most about RETAIN_S / 60 rows per API. Reads flush
first, so an answer includes the caller's last request.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from kiln.control.store import MINUTE_S, MinuteDelta, Store, percentile_bucket

FLUSH_S = 5.0
RETAIN_S = 25 * 3600  # "at least 24 hours"
WINDOWS = {"15m": 15 * 60, "1h": 3600, "24h": 86_400}
_CLASS = {2: "2xx", 4: "4xx", 5: "5xx"}
log = logging.getLogger("kiln.timeseries")


class TimeSeries:
    """Minute aggregates buffered in memory and kept in the store's `api_minutes`."""

    def __init__(
        self,
        store: Store,
        registry: Any,
        bounds: tuple[float, ...],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.registry = registry  # kiln.serving.router.Registry: replicas and queue samples
        self.bounds = bounds  # latency bucket upper bounds in seconds; one more for +Inf
        self._clock = clock
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._pending: dict[tuple[str, int], MinuteDelta] = {}
        self._pruned_at = 0.0

    # ---- hot path -----------------------------------------------------------------
    def observe(self, api: str, status: int, seconds: float) -> None:
        minute = int(self._clock()) // MINUTE_S * MINUTE_S
        bucket = bisect.bisect_left(self.bounds, seconds)
        with self._lock:
            delta = self._pending.get((api, minute))
            if delta is None:
                delta = self._pending[(api, minute)] = MinuteDelta(api, minute)
            cls = _CLASS.get(status // 100)
            if cls is not None:
                delta.classes[cls] = delta.classes.get(cls, 0) + 1
            delta.latency[bucket] = delta.latency.get(bucket, 0) + 1

    # ---- flushing -------------------------------------------------------------------
    def sample(self) -> None:
        """Add each served API's ready replicas and queue length to the current minute."""
        minute = int(self._clock()) // MINUTE_S * MINUTE_S
        for name, group in list(self.registry.groups.items()):
            versions = list(group.versions.values())
            ready = sum(len(v.ready_slots()) for v in versions)
            queue = sum(len(v.queue) for v in versions)
            with self._lock:
                delta = self._pending.get((name, minute))
                if delta is None:
                    delta = self._pending[(name, minute)] = MinuteDelta(name, minute)
                delta.replicas = ready
                delta.queue = max(delta.queue or 0, queue)

    def flush(self) -> None:
        """Write pending deltas (one transaction); prune once a minute. Thread-safe."""
        with self._flush_lock:
            with self._lock:
                pending, self._pending = self._pending, {}
            try:
                if pending:
                    self.store.add_minutes(pending.values())
                now = self._clock()
                if now - self._pruned_at >= MINUTE_S:
                    self.store.prune_minutes(now - RETAIN_S)
                    self._pruned_at = now
            except Exception as exc:  # noqa: BLE001 - keep the deltas, try again next tick
                log.warning("could not write the per-minute API series to the store: %s", exc)
                with self._lock:
                    for key, delta in pending.items():
                        if key in self._pending:
                            _merge(self._pending[key], delta)
                        else:
                            self._pending[key] = delta

    async def run(self) -> None:
        """Sample and flush every FLUSH_S seconds until cancelled."""
        while True:
            await asyncio.sleep(FLUSH_S)
            self.sample()
            await asyncio.to_thread(self.flush)

    # ---- reads ----------------------------------------------------------------------
    def points(self, api: str, window: str) -> dict[str, Any]:
        """The answer of `GET /apis/{api}/timeseries?window=`: one point per minute."""
        self.flush()
        span = WINDOWS[window]
        now = self._clock()
        last = int(now) // MINUTE_S * MINUTE_S
        first = last - span + MINUTE_S
        rows = {r.minute: r for r in self.store.minutes(api, first)}
        points = []
        for minute in range(first, last + MINUTE_S, MINUTE_S):
            row = rows.get(minute)
            point: dict[str, Any] = {"t": minute, "2xx": 0, "4xx": 0, "5xx": 0}
            for q in (50, 90, 99):
                point[f"p{q}_ms"] = self._ms(row.latency, q) if row else None
            point["replicas"] = row.replicas if row else None
            point["queue"] = row.queue if row else None
            if row:
                point.update(row.classes)
            points.append(point)
        return {"api": api, "window": window, "step_s": MINUTE_S, "points": points}

    def _ms(self, latency: dict[int, int], q: float) -> float | None:
        bucket = percentile_bucket(latency, q)
        if bucket is None:
            return None
        # The bucket's upper bound (what `kiln get` shows); past the last bound, that bound.
        return round(self.bounds[min(bucket, len(self.bounds) - 1)] * 1000, 3)


def _merge(into: MinuteDelta, other: MinuteDelta) -> None:
    for cls, n in other.classes.items():
        into.classes[cls] = into.classes.get(cls, 0) + n
    for bucket, n in other.latency.items():
        into.latency[bucket] = into.latency.get(bucket, 0) + n
    if into.replicas is None:
        into.replicas = other.replicas
    into.queue = max(into.queue or 0, other.queue or 0) if other.queue is not None else into.queue
