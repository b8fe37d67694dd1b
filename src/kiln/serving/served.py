"""One API version: its replicas, its queue, and the dispatcher between them.

The dispatcher sends each batch to the least-loaded ready replica that has
room (one batch at a time per replica with batching on, so requests gather
while the model runs; two without, so the next request is already waiting in
the worker when the current one finishes). The batch is written to the
worker's socket synchronously (`Replica.send_batch`), so the capacity it takes
is counted before the next batch is placed: no replica holds more than its
depth, and a burst spreads over idle replicas instead of piling onto one.
A replica running a stream takes no batch (it would wait behind the stream,
time out, and the kill that follows would cut the stream): batches wait for
another replica or for the stream's end.

Failures: the request a dying replica was running gets 503 and is not retried
elsewhere (a prediction may have side effects, so only the client may decide
to send it again); the batches waiting behind it in that worker had not
started, so they go back to the front of the queue with their deadlines.
Admission refuses (503) beyond `autoscaling.max_replica_concurrency` queued or
running requests per replica. A client that leaves cancels its request: if it
was still queued it never reaches a worker, if it was running its answer is
dropped (`kiln_requests_cancelled_total`). A version replaced by a rolling
update drains: it keeps dispatching until its queue is empty and its last
batch answered, while new requests go to its successor.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

from kiln.errors import Timeout, Unavailable
from kiln.sandbox.policy import SandboxPolicy
from kiln.serving.availability import not_ready_in_time, unavailable
from kiln.serving.batcher import DeadlineWatch, Pending, RequestQueue
from kiln.serving.dispatch import Dispatcher
from kiln.serving.placement import worker_spec_for
from kiln.serving.replica_pool import ReplicaPool
from kiln.serving.supervisor import ReplicaSlot
from kiln.serving.types import InferenceRequest, InferenceResponse


class ServedApi(ReplicaPool, Dispatcher):
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
        self._deadlines = DeadlineWatch(self._expire)
        self.max_replica_concurrency = api.autoscaling.max_replica_concurrency
        self._running = 0  # requests handed to workers by the dispatcher, not answered yet
        self.slots: list[ReplicaSlot] = []
        self._changed = asyncio.Event()
        self._capacity = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None  # the server's, on first request
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
        # Requests waiting for this API outside its queue (an AsyncAPI's durable queue,
        # control/asyncs.py): they count as load, so a backlog scales the API up.
        self.backlog = 0

    # ----- lifecycle ---------------------------------------------------------------
    def set_batching(self, max_batch_size: int, max_batch_delay_ms: float) -> None:
        """Change dynamic batching at run time (TorchServe's batch_size / max_batch_delay)."""
        self.max_batch_size = max(1, int(max_batch_size))
        self.batch_delay_s = max(0.0, float(max_batch_delay_ms)) / 1000
        self.depth = 1 if self.max_batch_size > 1 else 2
        self._capacity.set()

    def in_flight_total(self) -> int:
        """Requests queued (here or in an AsyncAPI's store queue) or running: the
        autoscaler's load signal."""
        running = sum(s.replica.in_flight for s in self.slots if s.replica is not None)
        return len(self.queue) + running + self.backlog

    async def stop(self, grace: float) -> None:
        """Drain, then stop the replicas.

        New requests go to the successor (a rolling update) or get 503 from now on;
        the dispatcher keeps going until the queue is empty and the last batch is
        answered (up to `grace`, and only while a replica can still answer).
        """
        self._stopping = True
        self._capacity.set()
        self._changed.set()  # requests waiting for a load get their 503 now (wait_ready)
        deadline = time.monotonic() + grace
        while self._draining() and time.monotonic() < deadline:
            if not any(s.state in ("ready", "restarting") for s in self.slots):
                break
            await asyncio.sleep(0.02)
        shutting_down = unavailable(self, "stopped")
        assert shutting_down is not None
        self.queue.fail_all(shutting_down)
        if self._dispatcher is not None:
            self._dispatcher.cancel()
        await self._stop_slots(self.slots, grace)
        self.queue.fail_all(shutting_down)  # requeued by a worker that stopped meanwhile

    def _draining(self) -> bool:
        """Work left: queued requests, batches in workers, explanations or streams running."""
        if len(self.queue) or self._running:
            return True
        return any(s.replica is not None and s.replica.in_flight for s in self.slots)

    async def wait_ready(self, timeout: float) -> None:
        """Wait for a ready replica (the first GET loads the model); 503 if it cannot load."""
        if self._stopping and self.successor is not None:
            return await self.successor.wait_ready(timeout)
        self.last_request_at = time.monotonic()
        if self.state == "scaled to zero":
            await self.cold_start()  # seed 003: a GET pings the API and loads the model
        deadline = time.monotonic() + timeout
        while self.state != "ready":
            error = unavailable(self)
            if error is not None:
                raise error
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise not_ready_in_time(self)
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
        serving = self.api.serving
        arrived = time.monotonic()
        deadline = request.deadline or arrived + serving.response_timeout_s
        self.last_request_at = arrived
        if self.state != "ready":
            deadline = await self._until_ready(deadline)
            arrived = time.monotonic()  # queued from now (queue time counts from here)
        queue = self.queue
        if len(queue) + self._running >= max(1, len(self.slots)) * self.max_replica_concurrency:
            self.stats["rejected"] += 1
            raise self._over_concurrency()
        # One loop per server: looked up once (each lookup is a getpid() system call).
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        pending = Pending(request, deadline, arrived, loop.create_future())
        # Nothing queued and a replica free: written to it from this task. Otherwise (and
        # while a worker restarts) requests wait in the bounded queue like any other.
        if not self._dispatch_now(pending):
            try:
                queue.put(pending)
            except Unavailable:
                self.stats["rejected"] += 1
                raise
            if self.depth == 1 and len(queue) >= self.max_batch_size:
                # A full batch may go ahead of the running one (`_pick_ahead`): the only
                # way a new request gives a dispatcher that waits for capacity work to do.
                # Waking it for every request cost a task step each at c=64.
                self._capacity.set()
        self.stats["requests"] += 1
        # The backstop past the deadline: one sweeping timer per API, not one per request
        # (nor asyncio.wait_for, which costs a task per request).
        self._deadlines.add(pending, loop)
        try:
            return await pending.future
        except asyncio.CancelledError:
            # The client left (the HTTP layer cancels its task): the cancelled future is
            # skipped by the queue, or its answer dropped when the worker sends it.
            self._cancelled("running" if pending.sent else "queued")
            raise
        finally:
            self._deadlines.discard(pending)
            self.last_request_at = time.monotonic()  # idle counts from the last answer

    async def _until_ready(self, deadline: float) -> float:
        """Not ready: cold start, wait for the first load, or the state's 503. The new deadline."""
        serving = self.api.serving
        state = self.state
        if state == "scaled to zero":
            await self.cold_start()
            state = self.state
            # Idle time starts after the load: a load longer than idle_timeout must not
            # send the API straight back to zero before this request is even queued.
            self.last_request_at = now = time.monotonic()
            deadline = now + serving.response_timeout_s
        error = unavailable(self, state)
        if error is not None:
            raise error
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
        return deadline

    def _over_concurrency(self) -> Unavailable:
        replicas = max(1, len(self.slots))
        return Unavailable(
            f"API '{self.name}' has {len(self.queue) + self._running} requests queued or "
            f"running, the most its {replicas} replica(s) may hold "
            f"(autoscaling.max_replica_concurrency: {self.max_replica_concurrency} per "
            f"replica); retry shortly, or raise max_replica_concurrency or max_replicas",
            retry_after=1,
        )

    def _cancelled(self, where: str) -> None:
        """Count a request whose client left: `where` is "queued" or "running"."""
        counter = getattr(self.observer, "cancelled", None)
        if counter is not None:
            counter(self, where)

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
        # The least work in flight (streams count): an idle replica when there is one.
        return min(ready, key=lambda r: (r.batches_in_flight, r.in_flight))

    async def explain(self, request: InferenceRequest) -> InferenceResponse:
        """One explanation: the handler's explain(), or the built-in explainer for tensors."""
        if self._stopping and self.successor is not None:
            return await self.successor.explain(request)
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
        try:
            async for chunk in replica.stream(request):
                yield chunk
        except asyncio.CancelledError:
            self._cancelled("running")
            raise
        finally:
            self._capacity.set()  # batches held back from this replica may go now

    @property
    def can_explain(self) -> bool:
        return any(s.replica is not None and s.replica.can_explain for s in self.slots)

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
