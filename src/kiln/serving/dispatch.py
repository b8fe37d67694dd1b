"""The dispatcher of one API version: which replica takes the next batch, and its outcome.

Mixed into `ServedApi` (served.py), which owns the queue and the replicas; the
seam is one call each way: the loop takes batches from the queue and writes
them to a replica (`Replica.send_batch`, synchronous, so the capacity a batch
takes is counted before the next one is placed), and a done callback on the
batch's future answers its requests (no task per batch). A batch that never
started in its worker (`NotStarted`: the worker died or was killed for an
earlier batch) goes back to the front of the queue.
"""

from __future__ import annotations

import asyncio
import time
from functools import partial
from typing import Any

from kiln.errors import KilnError, Unavailable
from kiln.serving import tracing
from kiln.serving.batcher import Pending, RequestQueue
from kiln.serving.replica_traffic import NotStarted
from kiln.serving.supervisor import ReplicaSlot


class Dispatcher:
    """Placing batches on replicas (mixed into ServedApi, which sets these attributes)."""

    name: str
    slots: list[ReplicaSlot]
    queue: RequestQueue
    depth: int
    max_batch_size: int
    batch_delay_s: float
    observer: Any
    stats: dict[str, int]
    _capacity: asyncio.Event
    _running: int
    _dispatcher: asyncio.Task[None] | None
    _forming = False  # the loop holds a partial batch while more requests join it
    _last_batch = 1  # requests in the batch answered last

    def _dispatch_now(self, pending: Pending) -> bool:
        """Send a lone request from its caller's task, when the dispatcher would send it
        alone at once anyway: nothing queued ahead of it, no batch being formed, a replica
        with room, and (with batching) no batch running that it should wait to join.

        This skips the queue's wake-up and one event-loop turn of the dispatcher task
        (c=1: a request no longer hops through a second task, docs/performance.md).
        With batching, only while requests have been coming alone (the last batch held
        one): after a larger batch, its clients' next requests arrive together, and
        sending the first of them alone would split them into two batches.
        False: the caller queues it as before. Once True, the request is owned: it
        was written to a worker, or (the worker just went away) requeued.
        """
        if self.queue or self._forming or self._dispatcher is None or self._dispatcher.done():
            return False
        if self.max_batch_size > 1 and self._last_batch > 1:
            return False
        slot = self._pick()
        if slot is None or (self.batch_delay_s and self._busy()):
            return False
        self._send(slot, [pending])
        return True

    def _pick(self) -> ReplicaSlot | None:
        """The least-loaded ready replica with room for one more batch, or None.

        A replica running a stream is never chosen: a batch would wait behind it.
        """
        best: ReplicaSlot | None = None
        best_load = 0
        depth = self.depth
        for slot in self.slots:
            replica = slot.replica
            if (
                replica is None
                or not slot.ready
                or replica.batches_in_flight >= depth
                or replica.streams_in_flight
            ):
                continue
            if best is None or replica.in_flight < best_load:
                best, best_load = slot, replica.in_flight
        if best is None and depth == 1 and len(self.queue) >= self.max_batch_size:
            return self._pick_ahead()
        return best

    def _pick_ahead(self) -> ReplicaSlot | None:
        """Every replica is busy and a FULL batch waits: send it ahead, to be queued behind
        the batch that started first (the likeliest to finish first).

        With batching a replica otherwise takes one batch at a time, so batches grow while
        it works; but then it idles for a round trip to the server between batches. A
        full batch cannot grow any more, so sending it early costs nothing (mlp at c=64
        with one replica: +10-15% req/s, docs/performance.md).
        """
        best: ReplicaSlot | None = None
        for slot in self.slots:
            replica = slot.replica
            if (
                not slot.ready
                or replica is None
                or replica.batches_in_flight != 1
                or replica.streams_in_flight
            ):
                continue
            if best is None or replica.batch_sent_at < best.replica.batch_sent_at:  # type: ignore[union-attr]
                best = slot
        return best

    def _busy(self) -> bool:
        """Some replica is running a batch (so a short batch may wait for more to join)."""
        return any(
            s.replica is not None and s.replica.batches_in_flight > s.replica.streams_in_flight
            for s in self.slots
        )

    async def _dispatch_loop(self) -> None:
        """Place queued batches until cancelled (`stop` cancels it once the queue drained)."""
        queue = self.queue
        while True:
            await queue.wait_nonempty()
            slot = self._pick()
            if slot is None:
                self._capacity.clear()
                await self._capacity.wait()
                continue
            batch = queue.take(self.max_batch_size)
            if batch and len(batch) < self.max_batch_size and self.batch_delay_s and self._busy():
                self._forming = True
                try:
                    await queue.top_up(batch, self.max_batch_size, self.batch_delay_s)
                finally:
                    self._forming = False
                slot = self._pick()  # capacity may have changed while the batch grew
                if slot is None:
                    queue.requeue(batch)
                    continue
            if batch and not self._send(slot, batch):
                # the worker went away between the choice and the write: wait for a change
                self._capacity.clear()
                await self._capacity.wait()

    def _send(self, slot: ReplicaSlot, batch: list[Pending]) -> bool:
        """Write `batch` to the slot's worker now (its capacity is taken before this returns).

        False when the worker could not take it; the batch is back in the queue then.
        """
        replica = slot.replica
        sent = time.monotonic()
        requests = []
        latest = 0.0
        for pending in batch:
            pending.sent = True
            requests.append(pending.request)
            if pending.deadline > latest:
                latest = pending.deadline
        try:
            if replica is None:
                raise NotStarted(f"the worker of API '{self.name}' is restarting", retry_after=1)
            replica.send_batch(
                requests, max(latest - sent, 0.001), on_done=partial(self._finish, batch, sent)
            )
        except NotStarted:
            self.queue.requeue(batch)
            return False
        except Exception as exc:  # noqa: BLE001 - never let the dispatcher die
            error = exc if isinstance(exc, KilnError) else Unavailable(f"internal error: {exc}")
            self._answer(batch, [error] * len(batch))
            return True
        self._running += len(batch)
        return True

    def _finish(self, batch: list[Pending], sent: float, future: asyncio.Future[Any]) -> None:
        """A batch's outcomes are in (a callback, not a task: nothing per batch to schedule).

        The replica calls it as soon as the worker's answer is decoded, in the same
        event-loop turn (`Replica.send_batch`'s `on_done`), so the requests' tasks wake
        one turn earlier than through a future's done callback.
        """
        self._running -= len(batch)
        self._capacity.set()
        error: BaseException | None
        if future.cancelled():
            error = Unavailable(f"the batch of API '{self.name}' was cancelled; retry")
        else:
            error = future.exception()
        if isinstance(error, NotStarted):
            self.queue.requeue(batch)  # it never ran: another worker (or this one, back) takes it
            return
        if error is None:
            outcomes = future.result()
        elif isinstance(error, KilnError):
            outcomes = [error] * len(batch)
        else:
            outcomes = [Unavailable(f"internal error while dispatching: {error}")] * len(batch)
        self._answer(batch, outcomes)
        if tracing.ENABLED:  # the one check per batch; spans of the traced requests in it
            tracing.record_batch(batch, sent, outcomes)
        self._last_batch = len(batch)
        self.stats["batches"] += 1
        self.stats["max_batch"] = max(self.stats["max_batch"], len(batch))
        if self.observer is not None:
            self.observer.batch(
                self, [sent - p.enqueued for p in batch], time.monotonic() - sent, len(batch)
            )
            tracked = [
                value
                for outcome in outcomes
                if not isinstance(outcome, BaseException) and outcome.tracked
                for value in outcome.tracked
            ]
            if tracked:
                self.observer.tracked(self, tracked)
            recorded = [
                metric
                for outcome in outcomes
                if not isinstance(outcome, BaseException) and outcome.handler_metrics
                for metric in outcome.handler_metrics
            ]
            if recorded:
                self.observer.handler_metrics(self, recorded)

    @staticmethod
    def _answer(batch: list[Pending], outcomes: list[Any]) -> None:
        """Answer each request; one whose client left (a done future) is dropped."""
        for pending, outcome in zip(batch, outcomes, strict=True):
            if pending.future.done():
                continue
            if isinstance(outcome, BaseException):
                pending.future.set_exception(outcome)
            else:
                pending.future.set_result(outcome)
