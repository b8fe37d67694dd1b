"""What a worker is running, as the server sees it: frames in flight and their answers.

Split from the worker's process lifecycle (`replica.py`, which spawns it and
notices its death) along the socket: this side writes requests as they come and
matches answers to them by id, so the server never blocks on a worker. The
worker runs frames strictly in order, so of the frames in flight only the oldest
has started: when the worker dies, that one fails with 503 and the later ones
with `NotStarted`, which the dispatcher turns back into queued requests.

`send_batch` is synchronous: the replica's capacity (`batches_in_flight`,
`in_flight`) is taken the moment the dispatcher chooses it, before anything is
awaited, so the next choice already sees it. Streams count as work in flight.
"""

from __future__ import annotations

import asyncio
import select
import sys
import time
import traceback
from collections.abc import AsyncIterator, Callable, Iterator
from functools import partial
from typing import Any

from kiln.errors import InvalidInput, KilnError, Timeout, Unavailable
from kiln.serving.ipc import FrameError, encode_frame
from kiln.serving.messages import (
    Batch,
    BatchReply,
    Cancel,
    Explain,
    FromWorker,
    RequestItem,
    Stream,
    StreamChunk,
    StreamEnd,
)
from kiln.serving.polling import ACTIVITY, PollWindow, wait_readable
from kiln.serving.process import WorkerProcess
from kiln.serving.types import InferenceRequest, InferenceResponse, WorkerSpec
from kiln.serving.wire import decode_outcomes, encode_request, from_wire_error

# What a stream's queue carries: the worker's messages, or None when the worker died.
StreamEvent = tuple[StreamChunk | StreamEnd, bytes] | None


class NotStarted(Unavailable):
    """The batch was still waiting in the worker when it died or was killed.

    Nothing of it ran, so it can go to another worker without being run twice;
    a 503 only where no dispatcher takes it back (explain)."""


class SentBatch:
    """A batch written to the worker and not answered yet."""

    __slots__ = ("future", "size", "timer", "on_done", "alone_at")

    def __init__(
        self,
        future: asyncio.Future[list[Any]],
        size: int,
        on_done: Callable[[asyncio.Future[list[Any]]], None] | None,
    ) -> None:
        self.future = future
        self.size = size
        self.timer: asyncio.TimerHandle | None = None
        self.on_done = on_done
        self.alone_at = 0.0  # perf_counter when sent as the server's only work (polling.py)


def _late_done(sent: SentBatch, future: asyncio.Future[list[Any]]) -> None:
    """`on_done` for a batch the worker's answer did not settle (an error, a timeout, an
    exit): called as the future's done callback, as before `on_done` existed."""
    on_done = sent.on_done
    if on_done is not None:
        sent.on_done = None
        on_done(future)


class ReplicaTraffic:
    """Frames in flight on one worker's socket (mixed into `Replica`, which sets these)."""

    spec: WorkerSpec
    exited: asyncio.Event
    exit_reason: str | None
    doomed: bool
    in_flight: int
    batch_sent_at: float
    _ids: Iterator[int]
    _pending: dict[int, SentBatch]
    _streams: dict[int, asyncio.Queue[StreamEvent]]
    _process: WorkerProcess | None
    _writer: asyncio.Transport | None
    _loop: asyncio.AbstractEventLoop | None
    _poll: PollWindow | None
    _poller: select.poll | None
    _log_line: Callable[[str], None]

    @property
    def batches_in_flight(self) -> int:
        """Frames the worker has to run or is running: batches, explanations and streams."""
        return len(self._pending) + len(self._streams)

    @property
    def streams_in_flight(self) -> int:
        return len(self._streams)

    def _oldest(self) -> int | None:
        """The frame the worker is running (ids grow; the worker runs frames in order)."""
        pending, streams = self._pending, self._streams
        if not streams:
            return min(pending) if pending else None
        if not pending:
            return min(streams)
        return min(min(pending), min(streams))

    def _settle(self, batch_id: int) -> SentBatch | None:
        """Take a batch out of flight: its capacity is free from this instant."""
        sent = self._pending.pop(batch_id, None)
        if sent is not None:
            self.in_flight -= sent.size
            if sent.timer is not None:
                sent.timer.cancel()
        return sent

    def _on_frame(self, message: FromWorker, buffers: list[memoryview]) -> None:
        """One frame from the worker, in the loop turn it arrived in (ipc.FrameProtocol)."""
        if isinstance(message, StreamChunk | StreamEnd):
            stream = self._streams.get(message.id)
            if stream is not None:
                stream.put_nowait((message, bytes(buffers[0]) if buffers else b""))
            return
        if not isinstance(message, BatchReply):
            raise FrameError(f"{type(message).__name__} after the worker was ready")
        sent = self._settle(message.id)
        if sent is not None and sent.alone_at and self._poll is not None:
            self._poll.learn(time.perf_counter() - sent.alone_at)
        if self._pending:  # the worker starts on the next batch now
            self.batch_sent_at = time.monotonic()
        if sent is None or sent.future.done():
            return
        try:
            outcomes = decode_outcomes(message, sent.size, buffers)
        except (FrameError, InvalidInput, ValueError) as exc:
            # It ran, but what came back is unusable: 503 for it, like a crash.
            sent.future.set_exception(
                Unavailable(
                    f"the worker of API '{self.spec.api}' sent an answer that does "
                    f"not fit the request; it is being restarted, retry shortly",
                    retry_after=1,
                )
            )
            raise FrameError(f"a reply that does not fit its batch: {exc}") from None
        sent.future.set_result(outcomes)
        on_done = sent.on_done
        if on_done is not None:  # now, not a loop turn later (see send_batch)
            sent.on_done = None
            try:
                on_done(sent.future)
            except Exception:  # noqa: BLE001 - as the loop treats a callback's
                traceback.print_exc(file=sys.stderr)

    def _not_started(self) -> NotStarted:
        return NotStarted(
            f"the worker of API '{self.spec.api}' {self.exit_reason} before starting this "
            f"request; retry shortly",
            retry_after=1,
        )

    def send_batch(
        self,
        requests: list[InferenceRequest],
        timeout: float | None,
        op: str = "batch",
        on_done: Callable[[asyncio.Future[list[Any]]], None] | None = None,
    ) -> asyncio.Future[list[InferenceResponse | KilnError]]:
        """Write requests as one frame now; the future gets one outcome per request, in order.

        Synchronous, so the capacity it takes is visible to the very next dispatch
        decision. The future fails with `NotStarted` when the worker dies before
        starting the batch, `Unavailable` when it dies running it, and `Timeout`
        (after killing the worker, which would otherwise stay wedged) on overrun.
        `on_done(future)` runs once the future is done: for the worker's answer in the
        same loop turn that decoded it (a done callback would run one turn later), for
        every other outcome as a done callback.
        """
        if self._writer is None or self.exited.is_set() or self.doomed:
            raise NotStarted(f"the worker of API '{self.spec.api}' is restarting", retry_after=1)
        batch_id = next(self._ids)
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Any]] = loop.create_future()
        if not self._pending:
            self.batch_sent_at = time.monotonic()
        sent = SentBatch(future, len(requests), on_done)
        if on_done is not None:
            future.add_done_callback(partial(_late_done, sent))
        self._pending[batch_id] = sent
        items, buffers = self._encode(requests)
        self.in_flight += len(requests)
        kind = Explain if op == "explain" else Batch
        writer = self._writer
        writer.writelines(encode_frame(kind(batch_id, items), buffers))
        if timeout is not None:
            sent.timer = loop.call_later(timeout, self._overrun, batch_id, len(requests))
        poll = self._poll
        if (
            poll is not None
            and ACTIVITY.alone()
            and self.in_flight == len(requests)
            and not writer.get_write_buffer_size()
        ):
            # The server's only request, written whole to an idle worker: wait for the
            # answer awake, for the window the last answers taught (polling.py).
            sent.alone_at = time.perf_counter()
            if poll.window and self._poller is not None:
                wait_readable(self._poller, poll.window)
        return future

    async def submit_batch(
        self, requests: list[InferenceRequest], timeout: float | None, op: str = "batch"
    ) -> list[InferenceResponse | KilnError]:
        """`send_batch` and wait for its outcomes."""
        return await self.send_batch(requests, timeout, op)

    @staticmethod
    def _encode(requests: list[InferenceRequest]) -> tuple[list[RequestItem], list[Any]]:
        items: list[RequestItem] = []
        buffers: list[Any] = []
        for request in requests:
            item, owned = encode_request(request)
            items.append(item)
            buffers.extend(owned)
        return items, buffers

    async def stream(self, request: InferenceRequest) -> AsyncIterator[tuple[bytes, str]]:
        """(chunk, content type) pairs as the handler yields them.

        Leaving the loop early (the client disconnected) tells the worker to
        stop the generator. A worker that dies mid-stream ends it with 503.
        """
        if self._writer is None or self.exited.is_set():
            raise Unavailable(f"the worker of API '{self.spec.api}' is restarting", retry_after=1)
        stream_id = next(self._ids)
        queue: asyncio.Queue[StreamEvent] = asyncio.Queue()
        self._streams[stream_id] = queue
        items, buffers = self._encode([request])
        self.in_flight += 1
        self._writer.writelines(encode_frame(Stream(stream_id, items), buffers))
        finished = False
        try:
            while True:
                event = await queue.get()
                if event is None:
                    raise Unavailable(
                        f"the worker of API '{self.spec.api}' {self.exit_reason} mid-stream",
                        retry_after=1,
                    )
                message, data = event
                if isinstance(message, StreamEnd):
                    finished = True
                    if message.error is not None:
                        raise from_wire_error(message.error)
                    return
                yield data, message.content_type
        finally:
            self.in_flight -= 1
            self._streams.pop(stream_id, None)
            if not finished and self._writer is not None and not self.exited.is_set():
                self._writer.writelines(encode_frame(Cancel(stream_id)))

    def _overrun(self, batch_id: int, size: int) -> None:
        """A batch outlived every deadline in it: answer 504 and replace the wedged worker.

        A batch that was sent ahead and still waits behind an earlier one has not
        started: it gets its 504, but the worker, busy within its deadlines, is kept
        (its late answer to this batch is dropped). When the running one overran,
        the batches waiting behind it go back to the dispatcher (`NotStarted`) at
        once, with their own deadlines, instead of dying with the worker.
        """
        if batch_id not in self._pending:
            return
        waiting = batch_id != self._oldest()
        sent = self._settle(batch_id)
        if sent is None or sent.future.done():
            return
        if waiting:
            sent.future.set_exception(
                Timeout(
                    f"API '{self.spec.api}' did not answer within its deadline "
                    f"(response_timeout_s); the request waited behind an earlier batch"
                )
            )
            return
        self.exit_reason = "overran its response timeout"
        self._log_line(
            f"a batch of {size} overran its deadline; "
            f"restarting the worker so it cannot stay wedged"
        )
        # Kill now, before the 504 is delivered, so no new request is routed to this worker.
        self.doomed = True
        if self._process is not None:
            self._process.kill()
        for later in list(self._pending):
            waiting_one = self._settle(later)
            if waiting_one is not None and not waiting_one.future.done():
                waiting_one.future.set_exception(self._not_started())
        sent.future.set_exception(
            Timeout(
                f"API '{self.spec.api}' did not answer within its deadline (response_timeout_s)"
            )
        )
