"""Prediction monitoring, server side: per API version, per minute bucket.

Classification counts each class; regression keeps count, min, max, sum and a
bounded sample per bucket for percentiles. Buckets older than a day are
dropped. `summary(window)` merges the buckets inside the window, which is what
`GET /apis/{name}/monitoring?window=1h` returns.
"""

from __future__ import annotations

import math
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

BUCKET_S = 60.0
KEEP_S = 24 * 3600.0
SAMPLE_CAP = 2000


@dataclass
class _Bucket:
    start: float
    classes: Counter[str] = field(default_factory=Counter)
    count: int = 0
    total: float = 0.0
    minimum: float = math.inf
    maximum: float = -math.inf
    sample: list[float] = field(default_factory=list)


class PredictionMonitor:
    def __init__(self, clock: Any = time.time) -> None:
        self._clock = clock
        self._buckets: dict[tuple[str, str], deque[_Bucket]] = {}
        self.model_types: dict[tuple[str, str], str] = {}

    def record(self, api: str, version: str, model_type: str, values: list[Any]) -> None:
        key = (api, version)
        self.model_types[key] = model_type
        now = self._clock()
        start = now - now % BUCKET_S
        buckets = self._buckets.setdefault(key, deque())
        if not buckets or buckets[-1].start != start:
            buckets.append(_Bucket(start))
            while buckets and buckets[0].start < now - KEEP_S:
                buckets.popleft()
        bucket = buckets[-1]
        if model_type == "classification":
            bucket.classes.update(values)
            return
        for value in values:
            bucket.count += 1
            bucket.total += value
            bucket.minimum = min(bucket.minimum, value)
            bucket.maximum = max(bucket.maximum, value)
            if len(bucket.sample) < SAMPLE_CAP:
                bucket.sample.append(value)

    def summary(self, api: str, version: str, window_s: float) -> dict[str, Any]:
        key = (api, version)
        model_type = self.model_types.get(key)
        since = self._clock() - window_s
        buckets = [b for b in self._buckets.get(key, ()) if b.start + BUCKET_S > since]
        result: dict[str, Any] = {"api": api, "version": version or None, "window_s": window_s}
        if model_type is None:
            return {**result, "model_type": None, "message": "nothing tracked yet"}
        result["model_type"] = model_type
        if model_type == "classification":
            merged: Counter[str] = Counter()
            for bucket in buckets:
                merged.update(bucket.classes)
            result["classes"] = dict(merged.most_common())
            result["count"] = sum(merged.values())
            return result
        count = sum(b.count for b in buckets)
        result["count"] = count
        if count:
            sample = sorted(v for b in buckets for v in b.sample)
            result.update(
                min=min(b.minimum for b in buckets if b.count),
                max=max(b.maximum for b in buckets if b.count),
                mean=sum(b.total for b in buckets) / count,
                p50=_percentile(sample, 50),
                p90=_percentile(sample, 90),
                p99=_percentile(sample, 99),
            )
        return result


def _percentile(ordered: list[float], q: float) -> float:
    if not ordered:
        return math.nan
    index = min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[index]
