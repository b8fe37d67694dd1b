"""Each answer's metrics sample and access-log line, recorded for a loop turn's answers together.

Why: under load a replica's answer finishes a whole batch of requests in one
event-loop turn, and each request's task used to update the Prometheus metrics
(five locked increments), the minute series, the usage counters and write its
log line before the next task ran. The same work done back to back for all of
them, one turn later, runs on warm caches and leaves the tasks short: with
answers written together (`fast_http_exchange.Outbox`) it was worth +25% req/s
for mlp at c=64 on the 2-vCPU box of docs/performance.md, where the server's
CPU is shared with the clients. Nothing is dropped or reordered: the records
are written in the order the answers finished, within one loop turn, before any
later request (a metrics scrape included) is read.
"""

from __future__ import annotations

import asyncio
import sys
import traceback
from typing import Any


class Bookkeeping:
    """Collects answers (`answered`) and records them at the next loop turn (`flush`)."""

    __slots__ = (
        "metrics",
        "log",
        "system",
        "_answers",
        "_scheduled",
        "_many_metrics",
        "_many_lines",
    )

    def __init__(self, metrics: Any, log: Any, system: str) -> None:
        self.metrics = metrics  # control/metrics.py Metrics (or the Ray forwarder), or None
        self.log = log  # control/logs.py LogSink (or the Ray forwarder): `write(api, record)`
        self.system = system  # the api name of Kiln's own routes: logged, never metered
        self._answers: list[tuple[Any, ...]] = []
        self._scheduled = False
        # The bulk recorders, where these objects have them (Metrics, LogSink; not Ray's).
        self._many_metrics = getattr(metrics, "answered", None)
        self._many_lines = getattr(log, "write_many", None)

    def answered(
        self,
        api: str,
        protocol: str,
        status: int,
        seconds: float,
        version: str | None,
        record: dict[str, Any] | None,
    ) -> None:
        """One answer: its metrics sample (not for Kiln's own routes) and its log record."""
        self._answers.append((api, protocol, status, seconds, version, record))
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Record every collected answer, in the order they finished: all at once where the
        metrics and the log take many (`Metrics.answered`, `LogSink.write_many`)."""
        self._scheduled = False
        answers, self._answers = self._answers, []
        metrics, log, system = self.metrics, self.log, self.system
        many_metrics, many_lines = self._many_metrics, self._many_lines
        if many_metrics is not None:
            _guarded(many_metrics, [a[:5] for a in answers if a[0] != system])
        if many_lines is not None:
            _guarded(many_lines, [(a[0], a[5]) for a in answers if a[5] is not None])
        if many_metrics is not None and many_lines is not None:
            return
        for api, protocol, status, seconds, version, record in answers:
            if many_metrics is None and metrics is not None and api != system:
                _guarded(metrics.request, api, protocol, status, seconds, version)
            if many_lines is None and record is not None:
                _guarded(log.write, api, record)


def _guarded(record: Any, *args: Any) -> None:
    """Call a recorder; a failure is printed, never raised into the loop (the rest go on)."""
    try:
        record(*args)
    except Exception:  # noqa: BLE001 - bookkeeping must not stop the event loop
        traceback.print_exc(file=sys.stderr)
