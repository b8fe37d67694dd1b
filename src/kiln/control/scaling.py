"""The loop that applies the recommender to a running API, once per tick.

It samples the API's in-flight requests (queued + running) every tick, averages
them over `autoscaling.window`, asks the `Recommender`, and calls
`ServedApi.scale`. Every change is logged with its reason and kept in the
API's `scaling_events` (shown by `GET /apis`).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from typing import Any

from kiln.control.autoscaler import Policy, Recommender

TICK_S = 1.0


def policy_for(served: Any) -> Policy:
    api = served.api
    scaling = api.autoscaling
    target = scaling.target_replica_concurrency or float(max(1, served.max_batch_size))
    low, high = served.replica_bounds
    return Policy(
        min_replicas=low,
        max_replicas=high,
        target_replica_concurrency=target,
        downscale_stabilization_s=scaling.downscale_stabilization_period,
        upscale_stabilization_s=scaling.upscale_stabilization_period,
        max_downscale_factor=scaling.max_downscale_factor,
        max_upscale_factor=scaling.max_upscale_factor,
        downscale_tolerance=scaling.downscale_tolerance,
        upscale_tolerance=scaling.upscale_tolerance,
        idle_timeout_s=scaling.idle_timeout,
    )


def autoscaling_enabled(served: Any) -> bool:
    low, high = served.replica_bounds
    return low == 0 or high > max(1, low)


class AutoscaleLoop:
    def __init__(self, served: Any, log: Any, tick_s: float = TICK_S, on_scale: Any = None) -> None:
        self.served = served
        self.log = log
        self.on_scale = on_scale  # (served, replicas, reason): the manager persists it
        self.tick_s = tick_s
        self.recommender = Recommender(policy_for(served), time.monotonic())
        window = served.api.autoscaling.window
        self._samples: deque[int] = deque(maxlen=max(1, math.ceil(window / tick_s)))

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.tick_s)
            served = self.served
            if served.state in ("loading", "failed", "unloaded", "stopped"):
                continue
            if not autoscaling_enabled(served):
                continue
            policy = policy_for(served)
            if policy != self.recommender.policy:  # the management API moved the bounds
                self.recommender.policy = policy
            self._samples.append(served.in_flight_total())
            now = time.monotonic()
            current = len(served.slots)
            decision = self.recommender.recommend(
                now,
                current,
                sum(self._samples) / len(self._samples),
                idle_for=now - served.last_request_at if served.in_flight_total() == 0 else 0.0,
            )
            if decision.replicas == current:
                continue
            event = {
                "time": round(time.time(), 3),
                "from": current,
                "to": decision.replicas,
                "reason": decision.reason,
            }
            served.scaling_events.append(event)
            self.log.write(served.name, {"event": "scaling", **event})
            await served.scale(decision.replicas)
            if self.on_scale is not None:
                await asyncio.to_thread(self.on_scale, served, decision.replicas, decision.reason)
