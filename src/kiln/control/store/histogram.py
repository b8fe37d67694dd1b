"""The stored histogram format for regression tracking: fixed log-scale bins.

Why fixed bins: counts from different processes, time buckets and restarts must add
up with a plain `count = count + n`; bins that depend on the data (t-digest centroids)
cannot be merged by SQL. Bin `k > 0` holds positive values in
[ZERO * GAMMA**(k-1), ZERO * GAMMA**k), bin `-k` the negatives mirrored, bin 0 values
whose magnitude is below ZERO. The bin scheme is part of the stored data: changing it
needs a migration.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping

GAMMA = 1.04
ZERO = 1e-9
RELATIVE_ERROR = (GAMMA - 1) / (GAMMA + 1)
_LOG_GAMMA = math.log(GAMMA)


def bin_of(value: float) -> int:
    """The bin that holds `value` (finite values only)."""
    magnitude = abs(value)
    if magnitude < ZERO:
        return 0
    k = int(math.floor(math.log(magnitude / ZERO) / _LOG_GAMMA)) + 1
    return k if value > 0 else -k


def bin_value(k: int) -> float:
    """The value a bin stands for: the point of least relative error in its range."""
    if k == 0:
        return 0.0
    lower = ZERO * GAMMA ** (abs(k) - 1)
    value = 2 * lower * GAMMA / (1 + GAMMA)
    return value if k > 0 else -value


def bin_counts(values: Iterable[float]) -> dict[int, int]:
    return dict(Counter(bin_of(v) for v in values))


def percentile(bins: Mapping[int, int], q: float) -> float:
    """Approximate q-th percentile (0..100) of the values counted in `bins`."""
    total = sum(bins.values())
    if total <= 0:
        raise ValueError("no values")
    # Nearest-rank definition: the smallest value with at least q% of values <= it.
    rank = max(1, math.ceil(min(max(q, 0.0), 100.0) / 100.0 * total))
    seen = 0
    for k in sorted(bins):  # bin order is value order: negatives, zero, positives
        seen += bins[k]
        if seen >= rank:
            return bin_value(k)
    return bin_value(max(bins))
