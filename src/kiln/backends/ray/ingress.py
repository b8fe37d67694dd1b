"""`KilnIngress`: Kiln's inference app as a Ray Serve deployment.

Serve's HTTP proxy (one per node) hands every request to this deployment, which
runs the same `InferenceApp` as `kiln serve` (protocols/app.py): every protocol,
its Registry and DataPlane, the batcher and queue of each API version. Only the
last hop differs: where a local `ServedApi` writes a batch to a worker's socket,
`RayServedApi` sends it to the API version's `KilnReplica` deployment handle, and
Serve chooses the replica and scales the deployment.

Kiln's dispatcher still limits work in flight per "replica"; here a replica is a
lane (`RemoteSlot`, each with its own `RemoteReplica` and counters), a share of
the deployment's concurrency: `lanes` batches (or twice as many without batching)
go out at once, and Serve spreads them. A call stuck on a dead node holds only its
own lane.

An API with `min_replicas: 0` starts at zero: the ingress asks for the model's
signature on the first request (the `scaled to zero` state's cold start), so
starting the ingress never wakes the deployment up.

Streaming: a stream is one call to the replica's `stream` generator method
(`handle.options(stream=True)`); its chunks come back in order as Serve yields them.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Any

from ray import serve
from ray.exceptions import RayError

from kiln.backends.ray.frames import batch_frame, outcomes_from_frame
from kiln.backends.ray.options import deployment_name
from kiln.backends.ray.telemetry import ForwardedLog, LogForwarder
from kiln.config import load_project
from kiln.control.logs import worker_record
from kiln.control.shared_quotas import in_namespace, shared_authority
from kiln.errors import KilnError, Timeout, Unavailable, error_from_wire
from kiln.protocols.app import InferenceApp
from kiln.serving.replica_traffic import NotStarted
from kiln.serving.router import Registry
from kiln.serving.served import ServedApi
from kiln.serving.types import InferenceRequest

NODE_HEADER = "x-kiln-node"
"""Response header naming the Ray node whose replica answered (operators, tests)."""
MAX_LANES = 16
HANDLE_GRACE_S = 10.0  # beyond the batch's own deadline, for the Ray hop itself
RETRY_DELAY_S = 0.1  # before a batch a dead worker never started goes back to the queue


class RemoteReplica:
    """What the dispatcher sees of a replica (serving/replica.py's `Replica` surface),
    sending each batch through a Serve deployment handle."""

    doomed = False
    pid: int | None = None

    def __init__(self, handle: Any, api: str, info: dict[str, Any]) -> None:
        self._handle = handle
        self._api = api
        self.signature: dict[str, Any] = info.get("signature") or {}
        self.can_explain: bool = bool(info.get("can_explain"))
        self.streams_in_flight = 0
        self.in_flight = 0
        self.batches_in_flight = 0
        self.batch_sent_at = 0.0
        self.exited = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    def send_batch(
        self,
        requests: list[InferenceRequest],
        timeout: float | None,
        op: str = "batch",
        on_done: Callable[[asyncio.Future[list[Any]]], None] | None = None,
    ) -> asyncio.Future[list[Any]]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Any]] = loop.create_future()
        if on_done is not None:
            future.add_done_callback(on_done)
        self.in_flight += len(requests)
        self.batches_in_flight += 1
        self.batch_sent_at = loop.time()
        task = loop.create_task(self._call(requests, timeout, op, future))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return future

    async def submit_batch(
        self, requests: list[InferenceRequest], timeout: float | None, op: str = "batch"
    ) -> list[Any]:
        return await self.send_batch(requests, timeout, op)

    async def _call(
        self,
        requests: list[InferenceRequest],
        timeout: float | None,
        op: str,
        future: asyncio.Future[list[Any]],
    ) -> None:
        size = len(requests)
        budget = timeout if timeout is not None else 120.0
        outcome: list[Any] | BaseException
        try:
            response = self._handle.run.remote(batch_frame(requests, op), budget)
            try:
                data, node = await asyncio.wait_for(response, budget + HANDLE_GRACE_S)
            except TimeoutError:
                response.cancel()
                raise Timeout(
                    f"API '{self._api}' did not answer within its deadline (response_timeout_s)"
                ) from None
            if not data:  # the replica's worker was gone: nothing ran
                await asyncio.sleep(RETRY_DELAY_S)
                raise NotStarted(f"the worker of API '{self._api}' is restarting", retry_after=1)
            outcomes = outcomes_from_frame(data, size)
            for item in outcomes:
                if not isinstance(item, BaseException):
                    item.headers = {**item.headers, NODE_HEADER: node}
            outcome = outcomes
        except KilnError as exc:
            outcome = exc
        except RayError as exc:  # the replica actor died or could not be reached
            print(f"ray: a batch of API '{self._api}' failed: {exc!r}", file=sys.stderr)
            outcome = Unavailable(
                f"the replica of API '{self._api}' went away before answering; retry shortly",
                retry_after=1,
            )
        except Exception as exc:  # noqa: BLE001 - never leave a request hanging
            print(f"ray: a batch of API '{self._api}' failed: {exc!r}", file=sys.stderr)
            outcome = Unavailable(f"internal error calling API '{self._api}'; retry")
        finally:
            self.in_flight -= size
            self.batches_in_flight -= 1
        if future.done():
            return
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)

    async def stream(self, request: InferenceRequest) -> AsyncIterator[tuple[bytes, str]]:
        """(chunk, content type) pairs in order, from the replica's `stream` generator.

        Leaving early (the client went away) cancels the call, which stops the
        handler's generator in the worker (Replica.stream's Cancel)."""
        self.in_flight += 1
        self.streams_in_flight += 1
        response = self._handle.options(stream=True).stream.remote(batch_frame([request]))
        finished = False
        try:
            async for item in response:
                if isinstance(item, dict):  # the handler's error: ends the stream
                    finished = True
                    kind, message, status = item["error"]
                    raise error_from_wire(kind, message, status)
                data, content_type = item
                yield data, content_type
            finished = True
        except RayError as exc:  # the replica actor died or could not be reached
            finished = True
            print(f"ray: a stream of API '{self._api}' failed: {exc!r}", file=sys.stderr)
            raise Unavailable(
                f"the replica of API '{self._api}' went away mid-stream; retry shortly",
                retry_after=1,
            ) from None
        finally:
            self.in_flight -= 1
            self.streams_in_flight -= 1
            if not finished:
                response.cancel()

    async def stop(self, grace: float = 10.0) -> None:
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=grace)

    def memory_bytes(self) -> int | None:
        return None

    def cpu_seconds(self) -> float | None:
        return None


class RemoteSlot:
    """A lane of the deployment's concurrency, in the place of a local `ReplicaSlot`."""

    restarts = 0
    oom_kills = 0
    error: str | None = None
    last_exit: str | None = None
    permanent = False
    backoff = 0.0

    def __init__(self, index: int, replica: RemoteReplica) -> None:
        self.index = index
        self.replica: RemoteReplica | None = replica
        self.state = "ready"
        self.gpus: list[str] = []

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    async def start(self) -> None:
        return None

    async def stop(self, grace: float) -> None:
        self.state = "stopped"
        if self.replica is not None:
            await self.replica.stop(grace)


class RayServedApi(ServedApi):
    """A `ServedApi` whose replicas are lanes to a `KilnReplica` deployment on Ray."""

    scaled_by_backend = True  # Serve's autoscaler decides, not Kiln's (AutoscaleLoop skips it)

    def __init__(self, api: Any, handle: Any, **kwargs: Any) -> None:
        super().__init__(api, **kwargs)
        self.handle = handle
        self.lanes = max(1, min(api.compute.max_replicas, MAX_LANES))
        self._info: dict[str, Any] | None = None

    async def start(self, replicas: int | None = None) -> None:
        """Open the lanes, with the model's signature from the deployment.

        With `min_replicas: 0` the API starts "scaled to zero" instead: asking for
        the signature would make Serve start a replica (a cold start) for nothing,
        so the first request asks (`scale(1)` through `cold_start`)."""
        if self.api.compute.min_replicas == 0:
            await super().start(0)
            return
        await self._fetch_info()
        await super().start(self.lanes)

    async def _fetch_info(self) -> None:
        try:
            self._info = await self.handle.info.remote()
        except RayError as exc:
            print(f"ray: API '{self.name}' did not start: {exc!r}", file=sys.stderr)
            raise Unavailable(
                f"API '{self.name}' could not start a replica on Ray; retry shortly",
                retry_after=1,
            ) from None

    def _new_slot(self, index: int) -> Any:
        assert self._info is not None
        return RemoteSlot(index, RemoteReplica(self.handle, self.name, self._info))

    async def scale(self, replicas: int) -> None:
        """Serve scales the deployment (its autoscaling_config); Kiln's lanes stay.

        The one exception is the first request to an API that started at zero:
        Serve holds the signature call while it starts a replica, then the lanes open."""
        if replicas <= 0 or self.slots:
            return
        await self._fetch_info()
        if self.slots:  # another cold start opened them meanwhile
            return
        self.slots = self._new_slots(0, self.lanes)
        self.scaled_to_zero = False
        await asyncio.gather(*(slot.start() for slot in self.slots))
        self._on_slot_change()


@serve.deployment
@serve.ingress()
class KilnIngress:
    """Kiln's inference app; one `RayServedApi` per API version of the project."""

    async def __init__(  # type: ignore[misc]  # Serve runs an async constructor
        self,
        handles: dict[str, Any],
        project_dir: str,
        config_file: str | None = None,
        store_url: str | None = None,
        owner: str | None = None,
    ) -> None:
        """`store_url`: API keys on, accounts and shared admission from that store
        (control/shared_quotas.py); `owner`: the user whose namespace the APIs are in."""
        project = load_project(project_dir, config_file)
        self.registry = Registry()
        self.forwarder = LogForwarder()  # to a control plane's logs, when there is one
        self.log = ForwardedLog(self.forwarder)
        self.forwarder.start()
        served: list[RayServedApi] = []
        for api in project.apis:
            name = deployment_name(api)
            one = RayServedApi(
                api if owner is None else in_namespace(api, owner),
                handles[name],
                cwd=str(project.root),
                log_line=partial(self._log_line, api.name),
            )
            served.append(one)
        await asyncio.gather(*(s.start() for s in served))
        for one in served:
            self.registry.add(one)
        self.authority = shared_authority(store_url) if store_url else None
        self.inference_app = InferenceApp(self.registry, self.log, auth=self.authority)
        if self.authority is not None:  # metering, key reloads: every second
            self._accounts = asyncio.get_running_loop().create_task(self.authority.run())

    async def __del__(self) -> None:
        """Serve calls this on a replica's graceful stop: write the last metered calls."""
        authority = getattr(self, "authority", None)
        if authority is not None:
            await asyncio.to_thread(authority.flush)

    def _log_line(self, api: str, line: str, replica: str | None = None) -> None:
        self.log.write(api, worker_record(line, replica))

    def __serve_build_asgi_app__(self) -> Any:
        return self.inference_app
