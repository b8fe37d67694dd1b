"""Traffic splitting and shadowing between the versions of one API.

An `ApiGroup` (router.py) holds at most one `Routing`; it exists only when the API
splits its unversioned traffic (two or more versions with a positive weight) or
mirrors it to a shadow version, so an API without either pays one attribute check
per request and nothing else.

- Weights are non-negative integers with a positive sum, normalised by their sum
  (90/10 and 9/1 are the same split). A request draws a point in [0, sum) and
  takes the version whose cumulative range holds it.
- Sticky: with `traffic_sticky_header`, a request carrying that header draws its
  point from a hash of the header's value instead of the RNG, so one value always
  lands on the same version while the weights stay the same (BLAKE2b, stable across
  processes and restarts, unlike Python's salted `hash`).
- Shadow: `percent` of the unversioned requests are also sent, fire-and-forget, to
  the shadow version (serving/data_plane.py runs the copy; its answer is dropped).
"""

from __future__ import annotations

import random
from bisect import bisect_right
from collections.abc import Mapping
from hashlib import blake2b

__all__ = ["Routing", "check_weights", "sticky_point"]

_SPAN = float(1 << 64)


def sticky_point(value: str) -> float:
    """A stable point in [0, 1) for a sticky header's value."""
    digest = blake2b(value.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / _SPAN


def check_weights(weights: Mapping[str, object]) -> str | None:
    """Why `weights` is not a valid split (None: it is): integers >= 0, sum > 0."""
    if not weights:
        return "the split names no version"
    for version, weight in weights.items():
        if isinstance(weight, bool) or not isinstance(weight, int):
            return f"the weight of version {version!r} is {weight!r}, not a whole number"
        if weight < 0:
            return f"the weight of version {version!r} is negative ({weight})"
    if sum(weights.values()) <= 0:  # type: ignore[arg-type]
        return "the weights add up to 0: give at least one version a positive weight"
    return None


class Routing:
    """One API's split, sticky header and shadow; immutable once built (swapped whole)."""

    __slots__ = (
        "weights",
        "source",
        "sticky_header",
        "shadow_version",
        "shadow_percent",
        "_versions",
        "_bounds",
        "_total",
        "_rng",
    )

    def __init__(
        self,
        weights: Mapping[str, int] | None,
        *,
        source: str = "kiln.yaml",
        sticky_header: str | None = None,
        shadow: tuple[str, float] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.weights: dict[str, int] = dict(weights or {})
        self.source = source  # "kiln.yaml" or "runtime" (kiln traffic, PUT, set-default)
        self.sticky_header = sticky_header.lower() if sticky_header else None
        self.shadow_version: str | None = shadow[0] if shadow else None
        self.shadow_percent: float = shadow[1] if shadow else 0.0
        positive = [(v, w) for v, w in self.weights.items() if w > 0]
        self._versions = tuple(v for v, _ in positive)
        bounds: list[float] = []
        total = 0
        for _, weight in positive:
            total += weight
            bounds.append(total)
        self._bounds = tuple(bounds)
        self._total = float(total)
        self._rng = rng or random.Random()

    @property
    def splits(self) -> bool:
        """Whether more than one version takes traffic (else only the shadow is active)."""
        return len(self._versions) > 1

    @property
    def lead(self) -> str | None:
        """The version with the largest weight (the first written on a tie): what
        metadata routes and `kiln get` call the API's default while a split is on."""
        if not self._versions:
            return None
        return max(self._versions, key=lambda v: self.weights[v])

    def choose(self, headers: Mapping[str, str] | None = None) -> str | None:
        """The version an unversioned request goes to (None: the group's default)."""
        versions = self._versions
        if len(versions) < 2:
            return versions[0] if versions else None
        header = self.sticky_header
        value = headers.get(header) if header is not None and headers is not None else None
        point = sticky_point(value) if value else self._rng.random()
        index = bisect_right(self._bounds, point * self._total)
        return versions[min(index, len(versions) - 1)]

    def mirrors(self) -> bool:
        """Draw whether this request is also copied to the shadow version."""
        if self.shadow_version is None:
            return False
        return self._rng.random() * 100.0 < self.shadow_percent

    def describe(self) -> dict[str, object]:
        """What GET /apis/{name} and `kiln get` show."""
        total = sum(self.weights.values()) or 1
        info: dict[str, object] = {
            "weights": dict(self.weights),
            "percent": {v: round(100.0 * w / total, 2) for v, w in self.weights.items()},
            "source": self.source,
        }
        if self.sticky_header:
            info["sticky_header"] = self.sticky_header
        if self.shadow_version is not None:
            info["shadow"] = {"version": self.shadow_version, "percent": self.shadow_percent}
        return info
