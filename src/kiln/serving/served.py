"""One API version: its replicas, its queue, and the dispatcher between them.

The dispatcher sends each batch to the least-loaded ready replica that has
room (one batch at a time per replica with batching on, so requests gather
while the model runs; two without, so the next request is already waiting in
the worker when the current one finishes). Requests held by a replica that
dies get 503 and are not retried elsewhere: a prediction may have side
effects, so only the client may decide to send it again.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator
from contextvars import ContextVar
from typing import Any

from kiln.errors import KilnError, Timeout, Unavailable
from kiln.sandbox.policy import SandboxPolicy
from kiln.serving.batcher import Pending, RequestQueue
from kiln.serving.placement import worker_spec_for
from kiln.serving.replica_pool import ReplicaPool
from kiln.serving.supervisor import ReplicaSlot
from kiln.serving.types import InferenceRequest, InferenceResponse

# Which version answered the request in this task: the HTTP layer reads it back after the
# handler returns, to count requests per version without every protocol passing it along.
SERVED_VERSION: ContextVar[str] = ContextVar("kiln_served_version", default="")


class ServedApi(ReplicaPool):
    """An API version: the unit that is loaded, scaled, queued and routed to."""

    def __init__(
        self,
        api: Any,
        *,
        cwd: str,
        log_line: Any,
        observer: Any = None,
        extra_env: dict[str, str] | None = None,
        revision: str | None = None,
        sandbox: SandboxPolicy | None = None,
        tenant: str = "",
    ) -> None:
        self.api = api
        # Without a server's policy (tests, embedding): today's unsandboxed workers.
        self.sandbox = sandbox or SandboxPolicy(enabled=False, inherit_env=True)
        self.tenant = tenant
        self.network = getattr(api, "network", None) or "none"
        self.revision = revision  # the deploy revision this came from (None: `kiln serve DIR`)
        # What the API's deployment declares (its env: mappings; for deployments also .env).
        declared = getattr(api, "worker_env", {}) if extra_env is None else extra_env
        self.extra_env = dict(declared)
        # Set when a rolling update replaced this one: requests that found it just before
        # the swap are handed to the new version instead of failing.
        self.successor: ServedApi | None = None
        self.compute_unavailable: str | None = None  # why no replica could be placed (GPUs)
        self.name: str = api.name
        self.version: str | None = api.version
        self.worker_spec = worker_spec_for(api)
        self.observer = observer  # metrics: .batch(served, queue_times, inference_s, size)
        self._cwd = cwd
        self._log_line = log_line
        batching = api.batching
        self.max_batch_size = batching.max_batch_size if batching else 1
        self.batch_delay_s = (batching.max_batch_delay_ms / 1000) if batching else 0.0
        self.depth = 1 if self.max_batch_size > 1 else 2
        self.queue = RequestQueue(self.name, api.serving.max_queue_size)
        self.slots: list[ReplicaSlot] = []
        self._changed = asyncio.Event()
        self._capacity = asyncio.Event()
        self._stopping = False
        self._dispatcher: asyncio.Task[None] | None = None
        self._below_min_since: float | None = None
        self._waiting_for_load = 0
        self.unloaded = False
        self.scaled_to_zero = False
        self.bounds_override: tuple[int, int] | None = None  # management API min/max_worker
        self.last_request_at = time.monotonic()
        self._cold_start: asyncio.Task[None] | None = None
        self.stats = {"requests": 0, "batches": 0, "max_batch": 0, "rejected": 0}
        self.scaling_events: deque[dict[str, Any]] = deque(maxlen=20)

    # ----- lifecycle ---------------------------------------------------------------
    def set_batching(self, max_batch_size: int, max_batch_delay_ms: float) -> None:
        """Change dynamic batching at run time (TorchServe's batch_size / max_batch_delay)."""
        self.max_batch_size = max(1, int(max_batch_size))
        self.batch_delay_s = max(0.0, float(max_batch_delay_ms)) / 1000
        self.depth = 1 if self.max_batch_size > 1 else 2
        self._capacity.set()

    def in_flight_total(self) -> int:
        """Requests queued or running: the autoscaler's load signal."""
        running = sum(s.replica.in_flight for s in self.slots if s.replica is not None)
        return len(self.queue) + running

    async def stop(self, grace: float) -> None:
        self._stopping = True
        deadline = time.monotonic() + grace
        while len(self.queue) and time.monotonic() < deadline and self.ready_slots():
            await asyncio.sleep(0.05)
        self.queue.fail_all(Unavailable(f"API '{self.name}' is shutting down", retry_after=5))
        if self._dispatcher is not None:
            self._dispatcher.cancel()
        await self._stop_slots(self.slots, grace)

    async def wait_ready(self, timeout: float) -> None:
        """Wait for a ready replica (the first GET loads the model); 503 if it cannot load."""
        self.last_request_at = time.monotonic()
        if self.state == "scaled to zero":
            await self.cold_start()  # seed 003: a GET pings the API and loads the model
        deadline = time.monotonic() + timeout
        while self.state != "ready":
            if self.state == "failed":
                raise Unavailable(f"API '{self.name}' failed to load: {self.error}", retry_after=5)
            if self.state == "compute unavailable":
                raise Unavailable(
                    f"API '{self.name}': compute unavailable ({self.compute_unavailable})",
                    retry_after=30,
                )
            if self.state in ("unloaded", "stopped"):
                raise Unavailable(f"API '{self.name}' is {self.state}", retry_after=5)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Unavailable(
                    f"API '{self.name}' is still {self.state}; retry shortly", retry_after=1
                )
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                pass

    # ----- requests ----------------------------------------------------------------
    async def predict(self, request: InferenceRequest) -> InferenceResponse:
        """Queue one request and wait for its answer, within its deadline (queue time included)."""
        if self._stopping and self.successor is not None:
            return await self.successor.predict(request)
        SERVED_VERSION.set(self.version or "")
        serving = self.api.serving
        arrived = time.monotonic()
        deadline = request.deadline or arrived + serving.response_timeout_s
        self.last_request_at = arrived
        state = self.state
        if state == "scaled to zero":
            await self.cold_start()
            state = self.state
            # Idle time starts after the load: a load longer than idle_timeout must not
            # send the API straight back to zero before this request is even queued.
            self.last_request_at = now = time.monotonic()
            deadline = now + serving.response_timeout_s
        if state == "failed":
            raise Unavailable(f"API '{self.name}' failed to load: {self.error}", retry_after=5)
        if state == "compute unavailable":
            raise Unavailable(
                f"API '{self.name}' has no replica: compute unavailable "
                f"({self.compute_unavailable})",
                retry_after=30,
            )
        if state == "unloaded":
            raise Unavailable(f"API '{self.name}' is unloaded; load it first", retry_after=5)
        if state == "loading":
            # The first load (seed 003's ping-to-load) is not the request's fault: its
            # deadline starts when the model is ready, as long as the queue has room.
            if self._waiting_for_load >= self.queue.max_size:
                self.stats["rejected"] += 1
                raise Unavailable(
                    f"API '{self.name}' is still loading and {self.queue.max_size} requests "
                    f"are already waiting; retry shortly",
                    retry_after=1,
                )
            self._waiting_for_load += 1
            try:
                await self.wait_ready(serving.startup_timeout_s)
            finally:
                self._waiting_for_load -= 1
            self.last_request_at = now = time.monotonic()
            deadline = now + serving.response_timeout_s
        # While a worker restarts, requests wait in the bounded queue like any other.
        pending = Pending(request, deadline)
        try:
            self.queue.put(pending)
        except Unavailable:
            self.stats["rejected"] += 1
            raise
        self.stats["requests"] += 1
        self._capacity.set()
        # A timer, not asyncio.wait_for: wait_for costs a task per request on the hot path.
        timer = asyncio.get_running_loop().call_later(
            max(0.0, deadline - time.monotonic()) + 1.0, self._expire, pending
        )
        try:
            return await pending.future
        finally:
            timer.cancel()
            self.last_request_at = time.monotonic()  # idle counts from the last answer

    def _expire(self, pending: Pending) -> None:
        if not pending.future.done():
            pending.future.set_exception(
                Timeout(f"API '{self.name}' did not answer within its deadline")
            )

    async def _replica_for_direct_call(self, request: InferenceRequest) -> Any:
        """A ready replica for work that bypasses the batch queue (explain, stream)."""
        if self.state != "ready":
            await self.wait_ready(self.api.serving.startup_timeout_s)
        ready = [s.replica for s in self.slots if s.ready and s.replica is not None]
        if not ready:
            raise Unavailable(
                f"API '{self.name}' has no ready worker; retry shortly", retry_after=1
            )
        return min(ready, key=lambda r: r.in_flight)

    async def explain(self, request: InferenceRequest) -> InferenceResponse:
        """One explanation: the handler's explain(), or the built-in explainer for tensors."""
        if self._stopping and self.successor is not None:
            return await self.successor.explain(request)
        SERVED_VERSION.set(self.version or "")
        replica = await self._replica_for_direct_call(request)
        timeout = self.api.serving.response_timeout_s
        outcome = (await replica.submit_batch([request], timeout, op="explain"))[0]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    async def stream(self, request: InferenceRequest) -> AsyncIterator[tuple[bytes, str]]:
        """Chunks as the handler yields them; streaming requests are never batched."""
        if self._stopping and self.successor is not None:
            async for chunk in self.successor.stream(request):
                yield chunk
            return
        replica = await self._replica_for_direct_call(request)
        self.stats["requests"] += 1
        async for chunk in replica.stream(request):
            yield chunk

    @property
    def can_explain(self) -> bool:
        return any(s.replica is not None and s.replica.can_explain for s in self.slots)

    def _pick(self) -> ReplicaSlot | None:
        """The least-loaded ready replica with room for one more batch, or None."""
        best: ReplicaSlot | None = None
        for slot in self.slots:
            replica = slot.replica
            if not slot.ready or replica is None or replica.batches_in_flight >= self.depth:
                continue
            if best is None or replica.in_flight < best.replica.in_flight:  # type: ignore[union-attr]
                best = slot
        if best is None and self.depth == 1 and len(self.queue) >= self.max_batch_size:
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
            if not slot.ready or replica is None or replica.batches_in_flight != 1:
                continue
            if best is None or replica.batch_sent_at < best.replica.batch_sent_at:  # type: ignore[union-attr]
                best = slot
        return best

    def _busy(self) -> bool:
        return any(s.replica is not None and s.replica.batches_in_flight for s in self.slots)

    async def _dispatch_loop(self) -> None:
        while not self._stopping:
            await self.queue.wait_nonempty()
            slot = self._pick()
            if slot is None:
                self._capacity.clear()
                await self._capacity.wait()
                continue
            batch = self.queue.take(self.max_batch_size)
            if batch and len(batch) < self.max_batch_size and self.batch_delay_s and self._busy():
                await self.queue.top_up(batch, self.max_batch_size, self.batch_delay_s)
                if not slot.ready:
                    slot = self._pick() or slot
            if batch:
                asyncio.create_task(self._run(slot, batch))

    async def _run(self, slot: ReplicaSlot, batch: list[Pending]) -> None:
        replica = slot.replica
        sent = time.monotonic()
        try:
            if replica is None:
                raise Unavailable(f"the worker of API '{self.name}' is restarting", retry_after=1)
            timeout = max(p.deadline for p in batch) - time.monotonic()
            outcomes = await replica.submit_batch([p.request for p in batch], max(timeout, 0.001))
        except KilnError as error:
            outcomes = [error] * len(batch)
        except Exception as exc:  # noqa: BLE001 - never let the dispatcher die
            outcomes = [Unavailable(f"internal error while dispatching: {exc}")] * len(batch)
        finally:
            self._capacity.set()
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
        for pending, outcome in zip(batch, outcomes, strict=True):
            if pending.future.done():
                continue
            if isinstance(outcome, BaseException):
                pending.future.set_exception(outcome)
            else:
                pending.future.set_result(outcome)

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "name": self.name,
            "version": self.version,
            "endpoint": self.api.endpoint,
            "runtime": self.api.runtime,
            "status": self.state,
            "replicas": {
                "ready": len(self.ready_slots()),
                "requested": len(self.slots),
                "min": self.api.compute.min_replicas,
                "max": self.max_replicas,
                "restarts": self.restarts,
            },
            "queue": {"length": len(self.queue), "max": self.queue.max_size},
            "batching": {
                "max_batch_size": self.max_batch_size,
                "max_batch_delay_ms": self.batch_delay_s * 1000,
            },
            "stats": dict(self.stats),
            "scaling_events": list(self.scaling_events),
        }
        if self.error:
            info["error"] = self.error
        return info
