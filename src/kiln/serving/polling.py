"""Brief busy-polling where an answer is imminent, instead of sleeping until it comes.

Why: a request crosses two processes (server -> worker -> server), so it wakes a
sleeping process twice more than a one-process server does. Where a CPU idles
between those hops, waking it costs more than the hop itself: on a VM whose guest
does not poll before it halts (cpuidle-haltpoll off, as on Firecracker microVMs,
`haltpoll.guest_halt_poll_ns=0`), a halted vCPU takes 30-50 us to run again and
comes back with cold caches, so the Python after it runs up to twice as slowly
(docs/performance.md, "c=1: where the wake-ups went"). So each side polls its
socket for a short window before it blocks, as the kernel's haltpoll governor
does for a whole guest: the window grows while answers arrive soon after it
ended, and shrinks when they arrive later than the limit, so a replica that gets
a request now and then stops polling after a few of them.

- A worker polls for its next frame after answering a lone request (`BlockingChannel`,
  armed by `Worker.run`); after a batch of several the server is busy and the next
  frame is not imminent. The CPU it burns is its own replica's (`compute.cpu`).
- The server polls for a worker's answer only when it has nothing else to do: one
  request in progress on the inference port (`ACTIVITY`), its batch written whole.
  Anything else that arrives meanwhile waits at most one window.

The limit is the server option `busy_poll_us` (server.yaml, `--busy-poll-us`; 0
turns polling off). Machines with one CPU never poll: the process polled for
would need the CPU the poller holds.
"""

from __future__ import annotations

import os
import select
import time

# A window that grows starts here (haltpoll's guest_halt_poll_grow_start is 50 us).
GROW_START_S = 50e-6


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity where the OS has one)."""
    getter = getattr(os, "sched_getaffinity", None)
    if getter is not None:
        try:
            return len(getter(0))
        except OSError:
            pass
    return os.cpu_count() or 1


class PollWindow:
    """How long to poll before blocking, learned from how long waits turned out.

    The cpuidle-haltpoll rule: a wait that ended within the window changes
    nothing; one that ended after the window but within `limit` doubles it (from
    `GROW_START_S`), since polling longer would have caught it; one longer than
    `limit` halves it (to 0 below the start), since polling would only burn CPU.
    """

    __slots__ = ("limit", "window")

    def __init__(self, limit_s: float) -> None:
        self.limit = max(0.0, limit_s)
        self.window = 0.0

    def learn(self, waited_s: float) -> None:
        if waited_s <= self.window:
            return
        if waited_s <= self.limit:
            self.window = min(self.limit, max(self.window * 2, GROW_START_S))
        elif self.window >= 2 * GROW_START_S:
            self.window /= 2
        else:
            self.window = 0.0


def for_limit(limit_us: int, cpus: int | None = None) -> PollWindow | None:
    """A window, or None where polling is off: limit 0, or one CPU (`cpus`, else this
    process's own count) for the poller and the process it waits for to share."""
    if limit_us <= 0 or (usable_cpus() if cpus is None else cpus) < 2:
        return None
    return PollWindow(limit_us / 1e6)


class Activity:
    """Requests the inference port is answering now: the server polls only when one is."""

    __slots__ = ("requests",)

    def __init__(self) -> None:
        self.requests = 0

    def alone(self) -> bool:
        return self.requests == 1


ACTIVITY = Activity()


def wait_readable(poller: select.poll, window_s: float) -> bool:
    """Poll `poller` without sleeping for up to `window_s`; True once a descriptor is ready.

    `sched_yield` between polls lets anything runnable on this CPU go first.
    """
    deadline = time.perf_counter() + window_s
    poll, now, yield_cpu = poller.poll, time.perf_counter, os.sched_yield
    while True:
        if poll(0):
            return True
        if now() >= deadline:
            return False
        yield_cpu()
