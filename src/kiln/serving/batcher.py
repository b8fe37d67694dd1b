"""The per-API queue: bounded, deadline-aware, and the batch-forming rule.

Requests wait here until a replica can take them. The rule that forms batches
is adaptive: when a replica is free, whatever is queued (up to
`max_batch_size`) leaves at once, so a lone request never waits for a delay.
Only while other batches are running (the model is busy anyway) does a
non-full batch wait up to `max_batch_delay_ms` for more requests to join.

A request whose client left is a done (cancelled) future: `take` drops it
before it reaches a worker. A batch that reached a worker but never started
there (the worker died or was killed) comes back with `requeue`, at the front
and with its deadlines, ahead of later arrivals. Every request also has a
backstop a second past its deadline (`DeadlineWatch`) for whatever no batch
timer or `take` answered.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from kiln.errors import Timeout, Unavailable
from kiln.serving.types import InferenceRequest, InferenceResponse


@dataclass(slots=True, eq=False)  # compared and hashed by identity (DeadlineWatch's set)
class Pending:
    """One queued request and the future its HTTP handler awaits."""

    request: InferenceRequest
    deadline: float
    enqueued: float = field(default_factory=time.monotonic)
    future: asyncio.Future[InferenceResponse] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    sent: bool = False  # handed to a worker (a client leaving now cancels it "running")


class RequestQueue:
    """A bounded FIFO of pending requests; full means 503 now, not a timeout later."""

    def __init__(self, api: str, max_size: int) -> None:
        self.api = api
        self.max_size = max_size
        self._items: deque[Pending] = deque()
        self._arrived = asyncio.Event()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, pending: Pending) -> None:
        if len(self._items) >= self.max_size:
            raise Unavailable(
                f"API '{self.api}' has {self.max_size} requests queued (serving.max_queue_size); "
                f"retry shortly, or add replicas",
                retry_after=1,
            )
        self._items.append(pending)
        self._arrived.set()

    def requeue(self, batch: list[Pending]) -> None:
        """Put requests that never started back at the front, in their order.

        They were admitted already, so `max_size` does not apply; their deadlines stand.
        """
        for pending in reversed(batch):
            if not pending.future.done():
                pending.sent = False
                self._items.appendleft(pending)
        if self._items:
            self._arrived.set()

    async def wait_nonempty(self) -> None:
        while not self._items:
            self._arrived.clear()
            await self._arrived.wait()

    def take(self, limit: int) -> list[Pending]:
        """Up to `limit` live requests; expired ones are answered 504 on the way."""
        batch: list[Pending] = []
        now = time.monotonic()
        while self._items and len(batch) < limit:
            pending = self._items.popleft()
            if pending.future.done():
                continue  # the client gave up (its own timeout) while queued
            if pending.deadline <= now:
                pending.future.set_exception(
                    Timeout(
                        f"API '{self.api}' did not answer within its deadline: the request "
                        f"waited in the queue past response_timeout_s"
                    )
                )
                continue
            batch.append(pending)
        return batch

    async def top_up(self, batch: list[Pending], limit: int, delay_s: float) -> None:
        """Let more requests join `batch` for up to `delay_s`, until it holds `limit`."""
        until = time.monotonic() + delay_s
        while len(batch) < limit:
            batch.extend(self.take(limit - len(batch)))
            remaining = until - time.monotonic()
            if len(batch) >= limit or remaining <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), remaining)
            except TimeoutError:
                batch.extend(self.take(limit - len(batch)))
                return

    def fail_all(self, error: Exception) -> None:
        while self._items:
            pending = self._items.popleft()
            if not pending.future.done():
                pending.future.set_exception(error)


BACKSTOP_S = 1.0  # a request is answered 504 this long past its deadline if nothing else did
SWEEP_S = 0.1  # how often the backstop looks (one timer per API, only while requests wait)


class DeadlineWatch:
    """Each request's backstop: a 504 `BACKSTOP_S` past its deadline if nothing answered it.

    The deadline itself is kept by the batch's timer (`Replica` overrun) and by `take`
    (expired requests leave the queue as 504s); this catches what neither reached, such
    as a request queued while no replica could take it. One timer per API that sweeps
    every `SWEEP_S` while requests wait, not one per request: `call_later` and `cancel`
    cost 2 us a request on the event loop (uvloop), on the path every request takes.
    """

    __slots__ = ("_expire", "_waiting", "_timer")

    def __init__(self, expire: Callable[[Pending], None]) -> None:
        self._expire = expire  # answers the request 504 (its future's exception)
        self._waiting: set[Pending] = set()
        self._timer: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self._waiting)

    def add(self, pending: Pending, loop: asyncio.AbstractEventLoop) -> None:
        self._waiting.add(pending)
        if self._timer is None:
            self._timer = loop.call_later(SWEEP_S, self._sweep, loop)

    def discard(self, pending: Pending) -> None:
        self._waiting.discard(pending)

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        now = time.monotonic()
        overdue = [p for p in self._waiting if max(p.deadline, p.enqueued) + BACKSTOP_S <= now]
        for pending in overdue:
            self._waiting.discard(pending)
            self._expire(pending)
        if self._waiting:
            self._timer = loop.call_later(SWEEP_S, self._sweep, loop)
