"""A worker's part of tracing: the phase times of a traced batch, and trace ids in its log.

Apart from `worker.py` because none of it runs for an untraced batch beyond one
loop over the items (`BatchClock.arrived`): workers export no spans
(docs/architecture.md, "Traces"); they time a traced batch's phases on the
machine's wall clock (`time.time_ns()`, as the server's spans are) and send them
back in the reply (`ReplyItem.timings`), and their log lines about a traced
request name its trace (control/logs.py `worker_record` reads the ids back).
"""

from __future__ import annotations

import time
from typing import Any

from kiln.serving.messages import RequestItem

# The W3C traceparent of each traced request of the batch being answered, by request id:
# the worker's log lines about a request name its trace (control/logs.py reads the ids
# back into the record's trace_id and span_id). Cleared, never rebound: importers hold it.
TRACES: dict[str, str] = {}


def trace_note(request_ids: str) -> str:
    """` trace_id=... span_id=...` for the first traced request of `request_ids`."""
    for request_id in request_ids.split(", "):
        parent = TRACES.get(request_id)
        if parent is not None and parent.count("-") == 3:
            _, trace_id, span_id, _ = parent.split("-")
            return f" trace_id={trace_id} span_id={span_id}"
    return ""


class ModelClock:
    """When a traced batch's model calls start and end (wall-clock ns, as the server's
    spans are): wraps a tensor runtime's `run` once the first traced batch arrives."""

    __slots__ = ("run", "first", "last")

    def __init__(self, run: Any) -> None:
        self.run = run
        self.first = 0  # 0: no model call in this batch (yet)
        self.last = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        start = time.time_ns()
        try:
            return self.run(*args, **kwargs)
        finally:
            if not self.first:
                self.first = start
            self.last = time.time_ns()


class BatchClock:
    """One worker's timing of traced batches: when one arrived, when its model ran, when
    its answers were encoded. The model clock is installed by the first traced batch, so
    a worker that never sees a trace never wraps its runtime."""

    __slots__ = ("pipeline", "model")

    def __init__(self, pipeline: Any) -> None:
        self.pipeline = pipeline
        self.model: ModelClock | None = None

    def arrived(self, items: list[RequestItem]) -> int:
        """When this batch arrived (wall-clock ns) if a request in it is traced, else 0.

        A traced batch's phases go back to the server in its reply (`ReplyItem.timings`),
        which records them as spans; its requests' trace ids go into the log lines."""
        for item in items:
            if item.trace is not None:
                break
        else:
            if TRACES:
                TRACES.clear()
            return 0
        TRACES.clear()
        for item in items:
            if item.trace is not None:
                TRACES[item.request_id] = item.trace
        runtime = getattr(self.pipeline, "runtime", None)
        if self.model is None and runtime is not None and callable(runtime.run):
            self.model = clock = ModelClock(runtime.run)
            runtime.run = clock  # only a tensor pipeline's model call, pre/post hooks aside
        if self.model is not None:
            self.model.first = self.model.last = 0
        return time.time_ns()

    def timings(self, received: int, model_start: int, model_end: int) -> list[int]:
        """[received, model start, model end, encoded]: the model is the runtime's calls for a
        tensor pipeline (pre_inference before, post_inference after), the handler's predict
        for Python handlers (pre_inference is then the decoding, post_inference the encoding)."""
        clock = self.model
        if clock is not None and clock.first:
            model_start, model_end = clock.first, clock.last
        encoded = time.time_ns()
        if not model_start:  # nothing ran (every body failed to decode)
            model_start = model_end = encoded
        return [received, model_start, model_end, encoded]
