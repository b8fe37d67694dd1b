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
_SLOT = {2: 0, 4: 1, 5: 2}  # status // 100 -> its count's index in a row
_CLASS_SLOT = (("2xx", 0), ("4xx", 1), ("5xx", 2))
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
        # (api, minute start) -> [2xx, 4xx, 5xx, one count per latency bucket, +Inf]
        self._counts: dict[tuple[str, int], list[int]] = {}
        self._gauges: dict[tuple[str, int], tuple[int, int]] = {}  # -> (replicas, max queue)
        self._retry: dict[tuple[str, int], MinuteDelta] = {}  # a failed flush's deltas
        self._width = 3 + len(bounds) + 1
        self._pruned_at = 0.0

    # ---- hot path -----------------------------------------------------------------
    def observe(self, api: str, status: int, seconds: float) -> None:
        """One answer (gRPC, Ray's forwarded metrics): `observe_many` of one."""
        self.observe_many([(api, status, seconds)])

    def observe_many(self, answers: list[tuple[str, int, float]]) -> None:
        """Answers (api, status, seconds): list increments under an uncontended lock, one
        lock for a loop turn's answers (protocols/bookkeeping.py via Metrics.answered)."""
        now = int(self._clock())
        minute = now - now % MINUTE_S
        bounds, width, counts = self.bounds, self._width, self._counts
        with self._lock:
            for api, status, seconds in answers:
                key = (api, minute)
                row = counts.get(key)
                if row is None:
                    row = counts[key] = [0] * width
                cls = _SLOT.get(status // 100)
                if cls is not None:
                    row[cls] += 1
                row[3 + bisect.bisect_left(bounds, seconds)] += 1

    # ---- flushing -------------------------------------------------------------------
    def sample(self) -> None:
        """Note each served API's ready replicas and queue length for the current minute."""
        now = int(self._clock())
        minute = now - now % MINUTE_S
        for name, group in list(self.registry.groups.items()):
            versions = list(group.versions.values())
            ready = sum(len(v.ready_slots()) for v in versions)
            queue = sum(len(v.queue) for v in versions)
            with self._lock:
                _, seen = self._gauges.get((name, minute), (0, 0))
                self._gauges[(name, minute)] = (ready, max(seen, queue))

    def _take(self) -> dict[tuple[str, int], MinuteDelta]:
        with self._lock:
            counts, self._counts = self._counts, {}
            gauges, self._gauges = self._gauges, {}
        deltas, self._retry = self._retry, {}
        for (api, minute), row in counts.items():
            delta = MinuteDelta(api, minute)
            delta.classes = {c: row[i] for c, i in _CLASS_SLOT if row[i]}
            delta.latency = {b - 3: n for b, n in enumerate(row[3:], start=3) if n}
            _add(deltas, delta)
        for (api, minute), (replicas, queue) in gauges.items():
            _add(deltas, MinuteDelta(api, minute, replicas=replicas, queue=queue))
        return deltas

    def flush(self) -> None:
        """Write pending deltas (one transaction); prune once a minute. Thread-safe."""
        with self._flush_lock:
            pending = self._take()
            try:
                if pending:
                    self.store.add_minutes(pending.values())
                now = self._clock()
                if now - self._pruned_at >= MINUTE_S:
                    self.store.prune_minutes(now - RETAIN_S)
                    self._pruned_at = now
            except Exception as exc:  # noqa: BLE001 - keep the deltas, try again next tick
                log.warning("could not write the per-minute API series to the store: %s", exc)
                self._retry = pending

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


def _add(deltas: dict[tuple[str, int], MinuteDelta], delta: MinuteDelta) -> None:
    """Merge `delta` into `deltas` (counts add up; the newer replicas, the larger queue)."""
    into = deltas.get((delta.api, delta.minute))
    if into is None:
        deltas[(delta.api, delta.minute)] = delta
        return
    for cls, n in delta.classes.items():
        into.classes[cls] = into.classes.get(cls, 0) + n
    for bucket, n in delta.latency.items():
        into.latency[bucket] = into.latency.get(bucket, 0) + n
    if delta.replicas is not None:
        into.replicas = delta.replicas
    if delta.queue is not None:
        into.queue = max(into.queue or 0, delta.queue)
