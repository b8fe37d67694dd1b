"""The loop that applies the recommender to a running API, once per tick.

Every tick it samples the API's in-flight requests (queued + running) and the
CPU its replicas used since the last tick, averages both over
`autoscaling.window`, asks the `Recommender`, and calls `ServedApi.scale`.
Every change is logged with its reason and kept in the API's `scaling_events`
(shown by `GET /apis`).

CPU (`compute.target_cpu_utilization`, as Cortex documented it): each replica's
CPU time (its cgroup's usage, else its process tree's utime + stime, see
`WorkerProcess.cpu_seconds`) over the tick, as a percent of `compute.cpu` (one
core when unset), averaged over the replicas; the recommender takes it as a
floor for the concurrency count. Only when kiln.yaml sets it: `compute.cpu`
defaults to 0.2, so one busy single-threaded worker reads ~500% of it, and a
default target would add replicas to every API that has any load at all.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from typing import Any

from kiln.control.autoscaler import Decision, Policy, Recommender

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
        target_cpu_utilization=(
            api.compute.target_cpu_utilization
            if "target_cpu_utilization" in api.compute.model_fields_set
            else None
        ),
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


class CpuMeter:
    """Replicas' CPU use between two samples, as a percent of what each may use.

    A replica is known by its worker (a restarted worker starts a new count);
    the first sample of a worker only sets its baseline.
    """

    def __init__(self) -> None:
        self._last: dict[int, tuple[float, float]] = {}  # id(replica) -> (cpu s, when)

    def sample(self, replicas: list[Any], cores: float, now: float) -> float | None:
        """The replicas' mean CPU percent since the last sample; None before a second one."""
        seen: dict[int, tuple[float, float]] = {}
        percents: list[float] = []
        for replica in replicas:
            used = replica.cpu_seconds()
            if used is None:
                continue
            key = id(replica)
            seen[key] = (used, now)
            before = self._last.get(key)
            if before is not None and now > before[1]:
                percents.append(100.0 * (used - before[0]) / ((now - before[1]) * cores))
        self._last = seen
        return sum(percents) / len(percents) if percents else None


class AutoscaleLoop:
    def __init__(self, served: Any, log: Any, tick_s: float = TICK_S, on_scale: Any = None) -> None:
        self.served = served
        self.log = log
        self.on_scale = on_scale  # (served, replicas, reason): the manager persists it
        self.tick_s = tick_s
        self.recommender = Recommender(policy_for(served), time.monotonic())
        window = served.api.autoscaling.window
        size = max(1, math.ceil(window / tick_s))
        self._samples: deque[int] = deque(maxlen=size)
        self._cpu_samples: deque[float] = deque(maxlen=size)
        self._cpu = CpuMeter()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.tick_s)
            await self.tick()

    def cpu_utilization(self) -> float | None:
        """The replicas' CPU percent averaged over the window (None until measured)."""
        if not self._cpu_samples:
            return None
        return sum(self._cpu_samples) / len(self._cpu_samples)

    def _sample_cpu(self, now: float) -> None:
        served = self.served
        replicas = [slot.replica for slot in served.slots if slot.replica is not None]
        cpu = self._cpu.sample(replicas, served.api.compute.cpu or 1.0, now)
        if cpu is not None:
            self._cpu_samples.append(cpu)

    async def tick(self) -> Decision | None:
        """One look at the API: sample, recommend, scale. The decision, when one was made."""
        served = self.served
        if served.state in ("loading", "failed", "unloaded", "stopped"):
            return None
        if not autoscaling_enabled(served):
            return None
        policy = policy_for(served)
        if policy != self.recommender.policy:  # the management API moved the bounds
            self.recommender.policy = policy
        now = time.monotonic()
        self._samples.append(served.in_flight_total())
        self._sample_cpu(now)
        current = len(served.slots)
        decision = self.recommender.recommend(
            now,
            current,
            sum(self._samples) / len(self._samples),
            cpu_utilization=self.cpu_utilization(),
            idle_for=now - served.last_request_at if served.in_flight_total() == 0 else 0.0,
        )
        if decision.replicas == current:
            return decision
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
        return decision
