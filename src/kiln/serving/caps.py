"""How many replicas an API may run, and which bound says so.

`machine_replica_cap` (placement.py) gives one number; scaling requests need to
know *which* bound they hit, so that a request over it is refused with a 400
naming the cap and its value instead of being clamped in silence (the seed
started 234 workers for `min_worker=1000` on a 2-core machine).

A `Cap` is one bound with the words that name it. The bounds of a replica are:
the API's own `compute.max_replicas`, the machine's cores for `compute.cpu`,
its memory for `compute.mem`, its GPUs for `compute.gpu`, and, for a user's API,
the plan's `max_replicas` (passed in as an extra cap by the control plane).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from kiln.errors import InvalidInput


@dataclass(frozen=True)
class Cap:
    value: int
    what: str  # e.g. "this machine's 2 cores at compute.cpu 1"


def machine_caps(compute: Any) -> list[Cap]:
    """The machine's bounds on replicas of `compute` (cores, memory, GPUs)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    cpu = max(compute.cpu or 1.0, 0.01)
    caps = [
        Cap(
            max(1, int(cores / cpu)),
            f"this machine's {cores} cores at compute.cpu {cpu:g} per replica",
        )
    ]
    if compute.mem:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        caps.append(
            Cap(
                max(1, total // compute.mem),
                f"this machine's {total / 2**30:.1f} GiB of memory at compute.mem "
                f"{compute.mem / 2**20:g} MiB per replica",
            )
        )
    if compute.gpu:
        from kiln.serving.gpus import allocator as gpu_allocator

        devices = len(gpu_allocator().devices)
        if devices:
            caps.append(
                Cap(
                    max(1, devices // compute.gpu),
                    f"this machine's {devices} GPUs at compute.gpu {compute.gpu} per replica",
                )
            )
    return caps


def replica_caps(compute: Any, extra: Iterable[Cap] = (), *, own_max: bool = True) -> list[Cap]:
    """Every bound on replicas: the API's max_replicas (with `own_max`), the machine's, `extra`."""
    own = [Cap(compute.max_replicas, "the API's compute.max_replicas")] if own_max else []
    return list(extra) + machine_caps(compute) + own  # on a tie, the first is named


def check_replicas(api_name: str, requested: dict[str, int], caps: list[Cap]) -> None:
    """Refuse (400) any requested count above the tightest cap, naming the cap and its value.

    `requested` maps what the caller asked with (`min_worker`, `compute.min_replicas`)
    to its value.
    """
    if not caps:
        return
    tightest = min(caps, key=lambda cap: cap.value)
    for asked, value in requested.items():
        if value > tightest.value:
            raise InvalidInput(
                f"{asked}={value} for API '{api_name}' is over its cap of {tightest.value} "
                f"replicas ({tightest.what}); ask for at most {tightest.value}"
            )
