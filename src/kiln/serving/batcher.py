"""The per-API queue: bounded, deadline-aware, and the batch-forming rule.

Requests wait here until a replica can take them. The rule that forms batches
is adaptive: when a replica is free, whatever is queued (up to
`max_batch_size`) leaves at once, so a lone request never waits for a delay.
Only while other batches are running (the model is busy anyway) does a
non-full batch wait up to `max_batch_delay_ms` for more requests to join.

A request whose client left is a done (cancelled) future: `take` drops it
before it reaches a worker. A batch that reached a worker but never started
there (the worker died or was killed) comes back with `requeue`, at the front
and with its deadlines, ahead of later arrivals.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field

from kiln.errors import Timeout, Unavailable
from kiln.serving.types import InferenceRequest, InferenceResponse


@dataclass(slots=True)
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
