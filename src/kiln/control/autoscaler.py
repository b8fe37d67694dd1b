"""The replica recommender: Cortex's documented algorithm as a pure, testable object.

Every tick the loop that owns an API feeds it the current replica count and the
in-flight requests (queued + running) averaged over `window`; it answers how
many replicas the API should have and why. It never touches processes: the
caller applies the answer, so every rule can be tested with a synthetic series.

Order of the rules per tick (Cortex v0.25 operator, reference section 4.2):
1. raw = average in-flight / target_replica_concurrency; rec = ceil(raw)
2. within the tolerance band of the current count -> keep the current count
3. per-event limits: between min(current-1, ceil(current*max_downscale_factor))
   and max(current+1, ceil(current*max_upscale_factor)) (so +-1 is always allowed)
4. clamp to [max(1, min_replicas), max_replicas]
5. stabilization: never below the highest recommendation of the last
   downscale_stabilization_period, never above the lowest of the last
   upscale_stabilization_period; no move at all in a direction until the
   recommender has run for that direction's full period
Plus `target_cpu_utilization` (the seed's knob): the CPU-based count
ceil(current * cpu_utilization / target) is a floor for the concurrency one.
Scale to zero is decided separately (`idle_for >= idle_timeout` with
`min_replicas: 0`), because no load signal exists at zero.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class Policy:
    min_replicas: int = 1
    max_replicas: int = 100
    target_replica_concurrency: float = 1.0
    target_cpu_utilization: float | None = None  # percent
    downscale_stabilization_s: float = 300.0
    upscale_stabilization_s: float = 60.0
    max_downscale_factor: float = 0.75
    max_upscale_factor: float = 1.5
    downscale_tolerance: float = 0.05
    upscale_tolerance: float = 0.05
    idle_timeout_s: float | None = None


@dataclass(frozen=True)
class Decision:
    replicas: int
    reason: str


class Recommender:
    def __init__(self, policy: Policy, started_at: float) -> None:
        self.policy = policy
        self.started_at = started_at
        self._history: deque[tuple[float, int]] = deque()

    def recommend(
        self,
        now: float,
        current: int,
        avg_in_flight: float,
        cpu_utilization: float | None = None,
        idle_for: float = 0.0,
    ) -> Decision:
        p = self.policy
        if current == 0:
            if avg_in_flight > 0:
                return Decision(max(1, p.min_replicas), "requests arrived while scaled to zero")
            return Decision(0, "scaled to zero and idle")
        if p.min_replicas == 0 and p.idle_timeout_s is not None and idle_for >= p.idle_timeout_s:
            self._history.clear()
            return Decision(0, f"no requests for {idle_for:.0f}s (idle_timeout)")

        raw = avg_in_flight / p.target_replica_concurrency
        rec = math.ceil(raw - 1e-9)
        reason = f"{avg_in_flight:.2f} in flight / target {p.target_replica_concurrency:g}"
        if p.target_cpu_utilization and cpu_utilization is not None:
            by_cpu_raw = current * cpu_utilization / p.target_cpu_utilization
            by_cpu = math.ceil(by_cpu_raw - 1e-9)
            if by_cpu > rec:
                raw, rec = by_cpu_raw, by_cpu  # the tolerance applies to the signal that won
                reason = f"cpu {cpu_utilization:.0f}% against target {p.target_cpu_utilization:g}%"
        ratio = raw / current
        if 1 - p.downscale_tolerance <= ratio <= 1 + p.upscale_tolerance and rec != current:
            rec, reason = current, f"{reason}: within tolerance of {current}"
        low = min(current - 1, math.ceil(current * p.max_downscale_factor))
        high = max(current + 1, math.ceil(current * p.max_upscale_factor))
        if rec < low:
            rec, reason = low, f"{reason}: limited by max_downscale_factor"
        elif rec > high:
            rec, reason = high, f"{reason}: limited by max_upscale_factor"
        floor = max(1, p.min_replicas)
        if rec < floor:
            rec, reason = floor, f"{reason}: min_replicas"
        if rec > p.max_replicas:
            rec, reason = p.max_replicas, f"{reason}: max_replicas"

        self._history.append((now, rec))
        horizon = max(p.downscale_stabilization_s, p.upscale_stabilization_s)
        while self._history and self._history[0][0] < now - horizon:
            self._history.popleft()
        recent_down = [r for t, r in self._history if t >= now - p.downscale_stabilization_s]
        recent_up = [r for t, r in self._history if t >= now - p.upscale_stabilization_s]
        final = rec
        if rec < current and max(recent_down) > rec:
            final = min(current, max(recent_down))
            reason = f"{reason}: downscale stabilization"
        elif rec > current and min(recent_up) < rec:
            final = max(current, min(recent_up))
            reason = f"{reason}: upscale stabilization"
        running = now - self.started_at
        if final < current and running < p.downscale_stabilization_s:
            final, reason = current, f"{reason}: warming up (no downscale yet)"
        if final > current and running < p.upscale_stabilization_s:
            final, reason = current, f"{reason}: warming up (no upscale yet)"
        return Decision(final, reason)
