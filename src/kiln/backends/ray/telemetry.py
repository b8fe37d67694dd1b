"""Logs and metrics from the cluster into the control plane's: what `kiln logs API`
merges on Ray, and what the control plane's metrics port counts under Kiln's names.

Every replica (its worker's lines) and every ingress replica (its request
records) buffers `(api, record)` pairs and pushes them twice a second to one
detached `LogCollector` actor; the control plane (`RayBackend`) drains it every
second into its own `LogSink`, so `kiln logs`, the console's tail and the log
files read the same records as on one machine, each with the replica and the
node it came from. Without a control plane (a Serve config or KubeRay alone)
there is no collector and the lines stay in the actors' stderr (Ray's logs).
The collector holds at most `MAX_RECORDS` (oldest dropped, counted) so a
control plane that is away cannot make it grow without bound.

Metrics go the same way: the cluster ingress's `MetricsForwarder` stands where
`kiln serve` has its `Metrics` (requests, batches) and the control plane replays
each event into its own `Metrics`, so `kiln_requests_total`,
`kiln_request_duration_seconds`, usage counts, `kiln get`'s requests and latency
and the console's charts cover the traffic served through Ray Serve's proxy.
"""

from __future__ import annotations

import asyncio
import collections
import time
from types import SimpleNamespace
from typing import Any

import ray

COLLECTOR = "kiln-logs"
NAMESPACE = "kiln"
MAX_RECORDS = 100_000
MAX_PENDING = 10_000  # per replica between pushes
PUSH_EVERY_S = 0.5
LOOKUP_EVERY_S = 5.0


@ray.remote(num_cpus=0)
class LogCollector:
    """The cluster's log records until the control plane takes them."""

    def __init__(self) -> None:
        self.records: collections.deque[tuple[str, dict[str, Any]]] = collections.deque(
            maxlen=MAX_RECORDS
        )
        self.events: collections.deque[tuple[Any, ...]] = collections.deque(maxlen=MAX_RECORDS)
        self.dropped = 0

    def push(
        self, batch: list[tuple[str, dict[str, Any]]], events: list[tuple[Any, ...]] | None = None
    ) -> None:
        self.dropped += max(0, len(self.records) + len(batch) - MAX_RECORDS)
        self.dropped += max(0, len(self.events) + len(events or []) - MAX_RECORDS)
        self.records.extend(batch)
        self.events.extend(events or [])

    def drain(self) -> tuple[list[tuple[str, dict[str, Any]]], list[tuple[Any, ...]], int]:
        out, events, dropped = list(self.records), list(self.events), self.dropped
        self.records.clear()
        self.events.clear()
        self.dropped = 0
        return out, events, dropped


def collector(create: bool = False) -> Any:
    """The cluster's collector (the control plane creates it); None when there is none."""
    try:
        return ray.get_actor(COLLECTOR, namespace=NAMESPACE)
    except ValueError:
        if not create:
            return None
    return LogCollector.options(  # type: ignore[attr-defined]
        name=COLLECTOR, namespace=NAMESPACE, lifetime="detached", get_if_exists=True
    ).remote()


class LogForwarder:
    """A replica's or ingress's records on their way to the collector."""

    def __init__(self) -> None:
        self.pending: list[tuple[str, dict[str, Any]]] = []
        self.events: list[tuple[Any, ...]] = []  # metric events (MetricsForwarder)
        self._actor: Any = None
        self._looked_at = 0.0
        self._task: asyncio.Task[None] | None = None

    def add(self, api: str, record: dict[str, Any]) -> None:
        if len(self.pending) < MAX_PENDING:
            self.pending.append((api, {"ts": round(time.time(), 3), **record}))

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(PUSH_EVERY_S)
            self.flush()

    def event(self, event: tuple[Any, ...]) -> None:
        if len(self.events) < MAX_PENDING * 10:
            self.events.append(event)

    def flush(self) -> None:
        if not self.pending and not self.events:
            return
        if self._actor is None and time.monotonic() - self._looked_at > LOOKUP_EVERY_S:
            self._looked_at = time.monotonic()
            self._actor = collector()
        if self._actor is None:  # no control plane: stderr (Ray's logs) has them
            self.pending.clear()
            self.events.clear()
            return
        batch, self.pending = self.pending, []
        events, self.events = self.events, []
        self._actor.push.remote(batch, events)


class MetricsForwarder:
    """The ingress's metrics, as events for the control plane's `Metrics` (`replay`)."""

    def __init__(self, forwarder: LogForwarder) -> None:
        self.forwarder = forwarder

    def request(
        self, api: str, protocol: str, status: int, seconds: float, version: str = ""
    ) -> None:
        self.forwarder.event(("request", api, protocol, status, seconds, version))

    def batch(self, served: Any, queue_times: list[float], inference_s: float, size: int) -> None:
        event = ("batch", served.name, served.version, list(queue_times), inference_s, size)
        self.forwarder.event(event)

    def tracked(self, served: Any, values: list[Any]) -> None:
        """Values for the API's `tracker:` (prediction monitoring)."""
        model_type = served.api.tracker.model_type
        self.forwarder.event(("tracked", served.name, served.version, model_type, list(values)))

    def handler_metrics(self, served: Any, recorded: list[Any]) -> None:
        """A TorchServe handler's `context.metrics`."""
        event = ("handler_metrics", served.name, served.version, [list(m) for m in recorded])
        self.forwarder.event(event)


class _Named:
    """What `Metrics` reads of a served API: its name, version and tracker's model type."""

    def __init__(self, name: str, version: str | None, model_type: str | None = None) -> None:
        self.name, self.version = name, version
        self.api = SimpleNamespace(tracker=SimpleNamespace(model_type=model_type))


def replay(metrics: Any, event: tuple[Any, ...]) -> None:
    """One forwarded event into the control plane's `Metrics`."""
    if event[0] == "request":
        _, api, protocol, status, seconds, version = event
        metrics.request(api, protocol, status, seconds, version)
    elif event[0] == "batch":
        _, name, version, queue_times, inference_s, size = event
        metrics.batch(_Named(name, version), queue_times, inference_s, size)
    elif event[0] == "tracked":
        _, name, version, model_type, values = event
        metrics.tracked(_Named(name, version, model_type), values)
    elif event[0] == "handler_metrics":
        _, name, version, recorded = event
        metrics.handler_metrics(_Named(name, version), recorded)


class ForwardedLog:
    """An ingress replica's log (what `InferenceApp` writes to: `write` only): its records
    go to the control plane. No file on the node: nobody there would read it, and it
    would grow with every request."""

    def __init__(self, forwarder: LogForwarder) -> None:
        self.forwarder = forwarder

    def write(self, api: str, record: dict[str, Any]) -> None:
        self.forwarder.add(api, record)
