"""Usage counters and tracker values that survive restarts, without a write per request.

The hot path only adds to in-memory dicts (a few hundred nanoseconds); a flusher
moves the deltas into the state store every `FLUSH_S` seconds in one
transaction, off the event loop. Reads (`kiln get`, `/apis/{name}/monitoring`)
flush what is pending first and then ask the store, so what a user sees always
includes their last request. At most `FLUSH_S` of counts can be lost to a
SIGKILL of the server; a clean stop flushes everything.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import defaultdict
from typing import Any

from kiln.control.store import Store, UsageIncrement
from kiln.control.store.histogram import bin_value

FLUSH_S = 1.0
_CLASSES = {n: f"{n}xx" for n in range(10)}
log = logging.getLogger("kiln.durable")


class DurableCounters:
    """Per-API usage by status class and tracker values, buffered in memory, kept in the store."""

    def __init__(self, store: Store, clock: Any = time.time) -> None:
        self.store = store
        self._clock = clock
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._usage: dict[tuple[str, str], int] = defaultdict(int)
        self._classes: dict[tuple[str, str], dict[str, int]] = {}
        self._values: dict[tuple[str, str], list[float]] = {}
        self.model_types: dict[tuple[str, str], str] = {}

    # ---- hot path -----------------------------------------------------------------
    def count_request(self, api: str, status: int) -> None:
        self.count_requests({(api, status): 1})

    def count_requests(self, counts: dict[tuple[str, int], int]) -> None:
        """`counts[(api, status)]` answers each, under one lock. The lock, because `flush`
        swaps the dict from a worker thread: without it an increment landing between its
        read and the swap would be lost."""
        with self._lock:
            usage = self._usage
            for (api, status), n in counts.items():
                usage[(api, _CLASSES[status // 100])] += n

    def record(self, api: str, version: str, model_type: str, values: list[Any]) -> None:
        """The tracker's values for one batch (same signature as PredictionMonitor.record)."""
        key = (api, version)
        self.model_types[key] = model_type
        with self._lock:
            if model_type == "classification":
                counts = self._classes.setdefault(key, defaultdict(int))
                for value in values:
                    counts[str(value)] += 1
            else:
                self._values.setdefault(key, []).extend(
                    float(v) for v in values if math.isfinite(v)
                )

    # ---- flushing -------------------------------------------------------------------
    def flush(self) -> None:
        """Write pending deltas to the store (one transaction per kind). Thread-safe.

        Flushes are serialised so that a read which flushes first never runs while
        another thread holds deltas it has taken but not yet written.
        """
        with self._flush_lock:
            self._flush()

    def _flush(self) -> None:
        with self._lock:
            usage, self._usage = self._usage, defaultdict(int)
            classes, self._classes = self._classes, {}
            values, self._values = self._values, {}
        try:
            if usage:
                self.store.add_usage_many(
                    UsageIncrement(api, status_class, n) for (api, status_class), n in usage.items()
                )
            for (api, version), counts in classes.items():
                self.store.add_class_counts(api, counts, version=version)
            for (api, version), kept in values.items():
                self.store.add_regression_values(api, kept, version=version)
        except Exception as exc:  # noqa: BLE001 - keep the deltas, try again next tick
            log.warning("could not write usage and tracker counts to the state store: %s", exc)
            self._merge_back(usage, classes, values)

    def _merge_back(self, usage: Any, classes: Any, values: Any) -> None:
        with self._lock:
            for key, n in usage.items():
                self._usage[key] += n
            for key, counts in classes.items():
                mine = self._classes.setdefault(key, defaultdict(int))
                for label, n in counts.items():
                    mine[label] += n
            for key, kept in values.items():
                self._values.setdefault(key, []).extend(kept)

    async def run(self) -> None:
        """Flush every FLUSH_S seconds until cancelled; the final flush is the caller's."""
        while True:
            await asyncio.sleep(FLUSH_S)
            await asyncio.to_thread(self.flush)

    # ---- reads ----------------------------------------------------------------------
    def usage_totals(self, api: str, since: float | None = None) -> dict[str, int]:
        self.flush()
        return self.store.usage_totals(api, since=since)

    def summary(self, api: str, version: str, window_s: float) -> dict[str, Any]:
        """The tracker's view over the last `window_s` seconds, from the store."""
        self.flush()
        key = (api, version)
        since = self._clock() - window_s
        result: dict[str, Any] = {"api": api, "version": version or None, "window_s": window_s}
        model_type = self.model_types.get(key)
        if model_type is None:
            if self.store.class_counts(api, version=version, since=since):
                model_type = "classification"
            elif self.store.regression_summary(api, version=version, since=since).count:
                model_type = "regression"
        if model_type is None:
            return {**result, "model_type": None, "message": "nothing tracked yet"}
        result["model_type"] = model_type
        if model_type == "classification":
            counts = self.store.class_counts(api, version=version, since=since)
            result["classes"] = dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
            result["count"] = sum(counts.values())
            return result
        stats = self.store.regression_summary(api, version=version, since=since)
        result["count"] = stats.count
        if stats.count:
            result.update(
                min=stats.minimum,
                max=stats.maximum,
                mean=stats.mean,
                p50=stats.percentile(50),
                p90=stats.percentile(90),
                p99=stats.percentile(99),
                histogram=linear_histogram(stats.bins, stats.minimum, stats.maximum),
            )
        return result


HISTOGRAM_BINS = 20


def linear_histogram(
    bins: dict[int, int], low: float | None, high: float | None, n: int = HISTOGRAM_BINS
) -> dict[str, list[float] | list[int]]:
    """The stored log-scale bins regrouped into `n` equal-width bins over [low, high].

    Why regroup: the store keeps ~4%-wide log bins (mergeable by SQL), thousands of
    them; a reader wants a handful of equal bars. Each stored bin counts at its
    representative value, clamped to [low, high], so a bar is exact to that 4%.
    `edges` has n + 1 values (one bin of width 0 when every value is the same)."""
    if low is None or high is None or not bins:
        return {"edges": [], "counts": []}
    if high <= low:
        return {"edges": [low, high], "counts": [sum(bins.values())]}
    width = (high - low) / n
    counts = [0] * n
    for k, c in bins.items():
        value = min(max(bin_value(k), low), high)
        counts[min(n - 1, int((value - low) / width))] += c
    return {"edges": [low + i * width for i in range(n)] + [high], "counts": counts}
