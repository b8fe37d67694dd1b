"""The values the store hands out: frozen dataclasses, never ORM rows or connections.

Callers (the server, the autoscaler, the tracker, the CLI's REST layer) depend on
these shapes only, so the tables behind them can change through migrations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from . import histogram


class StoreError(Exception):
    """Base class of the state store's errors."""


class SchemaTooNewError(StoreError):
    """The database was written by a newer Kiln; this code refuses to touch it."""


class NotFoundError(StoreError, LookupError):
    """The deployment, revision or API named does not exist."""


@dataclass(frozen=True)
class ApiSpec:
    """An API as a revision declares it (input to `Store.add_revision`)."""

    name: str
    version: str = ""
    min_replicas: int = 1
    max_replicas: int = 1
    init_replicas: int = 1


@dataclass(frozen=True)
class Deployment:
    name: str
    current_revision: str | None
    created_at: float
    updated_at: float


@dataclass(frozen=True)
class Revision:
    id: int
    deployment: str
    content_hash: str
    created_at: float
    status: str
    error: str | None
    artifact_path: str
    config_text: str


@dataclass(frozen=True)
class ApiRecord:
    """An API of one revision, with the replica count the autoscaler last asked for."""

    deployment: str
    revision: str
    name: str
    version: str
    min_replicas: int
    max_replicas: int
    init_replicas: int
    requested_replicas: int


@dataclass(frozen=True)
class ScalingEvent:
    id: int
    at: float
    api: str
    version: str
    from_replicas: int
    to_replicas: int
    reason: str


@dataclass(frozen=True)
class UsageRow:
    """Requests of one API version in one UTC day, by status class ("2xx", "5xx", ...)."""

    api: str
    version: str
    period_start: int
    status_class: str
    count: int


@dataclass(frozen=True)
class UsageIncrement:
    """One pending usage increment, for `Store.add_usage_many` (a batched flush)."""

    api: str
    status_class: str
    count: int = 1
    version: str = ""
    at: float | None = None


@dataclass(frozen=True)
class RegressionSummary:
    """Regression tracker statistics over a window: exact moments, approximate percentiles.

    Percentiles come from a log-scale histogram (`histogram.py`), accurate to about
    `histogram.RELATIVE_ERROR` of the value, clamped to [minimum, maximum]; the 0th and
    100th percentiles are the exact minimum and maximum.
    """

    count: int = 0
    minimum: float | None = None
    maximum: float | None = None
    total: float = 0.0
    sum_squares: float = 0.0
    bins: dict[int, int] = field(default_factory=dict)

    @property
    def mean(self) -> float | None:
        return self.total / self.count if self.count else None

    @property
    def stddev(self) -> float | None:
        if not self.count:
            return None
        mean = self.total / self.count
        return math.sqrt(max(self.sum_squares / self.count - mean * mean, 0.0))

    def percentile(self, q: float) -> float | None:
        """The q-th percentile (0..100), or None without values."""
        if not self.count or self.minimum is None or self.maximum is None:
            return None
        if q <= 0:
            return self.minimum
        if q >= 100:
            return self.maximum
        # Nearest rank: with fewer than 100 values the p99 *is* the largest one (and a low
        # percentile of few values the smallest). A bin only knows its value to 4%, which
        # printed a p99 below the observed max: the exact extremes are known, use them.
        rank = max(1, math.ceil(q / 100.0 * self.count))
        if rank >= self.count:
            return self.maximum
        if rank <= 1:
            return self.minimum
        value = histogram.percentile(self.bins, q)
        return min(max(value, self.minimum), self.maximum)
