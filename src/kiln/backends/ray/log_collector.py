"""Logs from the cluster into the control plane's: what `kiln logs API` merges on Ray.

Every replica (its worker's lines) and every ingress replica (its request
records) buffers `(api, record)` pairs and pushes them twice a second to one
detached `LogCollector` actor; the control plane (`RayBackend`) drains it every
second into its own `LogSink`, so `kiln logs`, the console's tail and the log
files read the same records as on one machine, each with the replica and the
node it came from. Without a control plane (a Serve config or KubeRay alone)
there is no collector and the lines stay in the actors' stderr (Ray's logs).
The collector holds at most `MAX_RECORDS` (oldest dropped, counted) so a
control plane that is away cannot make it grow without bound.
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Any

import ray

from kiln.control.logs import LogSink

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
        self.dropped = 0

    def push(self, batch: list[tuple[str, dict[str, Any]]]) -> None:
        self.dropped += max(0, len(self.records) + len(batch) - MAX_RECORDS)
        self.records.extend(batch)

    def drain(self) -> tuple[list[tuple[str, dict[str, Any]]], int]:
        out, dropped = list(self.records), self.dropped
        self.records.clear()
        self.dropped = 0
        return out, dropped


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

    def flush(self) -> None:
        if not self.pending:
            return
        if self._actor is None and time.monotonic() - self._looked_at > LOOKUP_EVERY_S:
            self._looked_at = time.monotonic()
            self._actor = collector()
        if self._actor is None:  # no control plane: stderr (Ray's logs) has them
            self.pending.clear()
            return
        batch, self.pending = self.pending, []
        self._actor.push.remote(batch)


class ForwardingLogSink(LogSink):
    """An ingress's `LogSink` whose records also go to the control plane."""

    def __init__(self, *args: Any, forwarder: LogForwarder, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.forwarder = forwarder

    def write(self, api: str, record: dict[str, Any]) -> None:
        super().write(api, record)
        self.forwarder.add(api, record)
