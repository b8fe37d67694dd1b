"""The server's handle on one worker process: spawn, send requests, notice death.

Requests are written to the worker's socket as they come and matched to their
answers by id, so the server never blocks on a worker. The worker runs frames
strictly in order, so of the frames in flight only the oldest has started. When
the socket closes (the worker crashed, was killed or exited) that one fails
with 503 and the later ones fail with `NotStarted`, which the dispatcher turns
back into queued requests; the owner decides whether to start a new worker.

`send_batch` is synchronous: the replica's capacity (`batches_in_flight`,
`in_flight`) is taken the moment the dispatcher chooses it, before anything is
awaited, so the next choice already sees it. Streams count as work in flight.
"""

from __future__ import annotations

import asyncio
import itertools
import select
import socket
import sys
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from typing import Any

from kiln.errors import InvalidInput, KilnError, Timeout, Unavailable
from kiln.sandbox.spec import LaunchSpec
from kiln.serving.ipc import FrameError, FrameProtocol, encode_frame
from kiln.serving.messages import (
    FROM_WORKER,
    Batch,
    BatchReply,
    Cancel,
    Explain,
    Failed,
    FromWorker,
    Init,
    Ready,
    RequestItem,
    Stream,
    StreamChunk,
    StreamEnd,
)
from kiln.serving.polling import ACTIVITY, for_limit, wait_readable
from kiln.serving.process import WorkerProcess, describe_exit
from kiln.serving.types import InferenceRequest, InferenceResponse, WorkerSpec
from kiln.serving.wire import decode_outcomes, encode_request, from_wire_error

# What a stream's queue carries: the worker's messages, or None when the worker died.
_StreamEvent = tuple[StreamChunk | StreamEnd, bytes] | None

LaunchFactory = Callable[[list[str], tuple[int, ...]], LaunchSpec]
"""(argv, descriptors to pass) -> how to start the worker (sandbox, env, limits)."""


class LoadFailed(Exception):
    """The worker could not load the model or the user's code.

    `permanent`: the worker judged that no retry can succeed (a SyntaxError, a
    missing module, a configuration the runtime refuses), so the slot stops trying.
    """

    def __init__(self, message: str, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


class NotStarted(Unavailable):
    """The batch was still waiting in the worker when it died or was killed.

    Nothing of it ran, so it can go to another worker without being run twice;
    a 503 only where no dispatcher takes it back (explain)."""


class _Sent:
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


def _late_done(sent: _Sent, future: asyncio.Future[list[Any]]) -> None:
    """`on_done` for a batch the worker's answer did not settle (an error, a timeout, an
    exit): called as the future's done callback, as before `on_done` existed."""
    on_done = sent.on_done
    if on_done is not None:
        sent.on_done = None
        on_done(future)


class Replica:
    """One worker process serving one API version."""

    def __init__(
        self,
        spec: WorkerSpec,
        *,
        launch: LaunchFactory,
        log_line: Callable[[str], None],
        on_exit: Callable[[Replica], Awaitable[None]] | None = None,
    ) -> None:
        self.spec = spec
        self._launch = launch
        self._log_line = log_line
        self._on_exit = on_exit
        self._ids = itertools.count(1)
        self._pending: dict[int, _Sent] = {}
        self._streams: dict[int, asyncio.Queue[_StreamEvent]] = {}
        self._process: WorkerProcess | None = None
        self._writer: asyncio.Transport | None = None  # the worker's socket (FrameProtocol's)
        self._tasks: list[asyncio.Task[Any]] = []
        self.signature: dict[str, Any] = {}
        self.can_explain = False
        self.pid: int | None = None
        self.stopping = False
        self.exited = asyncio.Event()
        self.exit_reason: str | None = None
        self.oom = False  # the kernel killed it at its memory limit
        self.doomed = False  # killed on purpose; no new work goes here
        self.in_flight = 0  # requests (streams included) sent and not answered yet
        self.batch_sent_at = 0.0  # when the oldest batch in flight was sent
        self._loop: asyncio.AbstractEventLoop | None = None  # the server's, on first send
        # Polling for the answer of a batch sent while the server had nothing else to do
        # (serving/polling.py): the window, and a poll object on the worker's socket.
        self._poll = for_limit(spec.poll_us)
        self._poller: select.poll | None = None

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

    def _settle(self, batch_id: int) -> _Sent | None:
        """Take a batch out of flight: its capacity is free from this instant."""
        sent = self._pending.pop(batch_id, None)
        if sent is not None:
            self.in_flight -= sent.size
            if sent.timer is not None:
                sent.timer.cancel()
        return sent

    async def start(self, timeout: float) -> None:
        """Spawn the worker and wait until it has loaded the model (or failed to)."""
        parent, child = socket.socketpair()
        try:
            argv = [sys.executable, "-m", "kiln.serving.worker", str(child.fileno())]
            self._process = WorkerProcess(self._launch(argv, (child.fileno(),)), self._log_line)
            await self._process.spawn()
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        self.pid = self._process.pid
        loop = asyncio.get_running_loop()
        transport, channel = await loop.create_connection(
            lambda: FrameProtocol(FROM_WORKER), sock=parent
        )
        self._writer = transport
        if self._poll is not None:
            self._poller = select.poll()
            self._poller.register(parent.fileno(), select.POLLIN)
        transport.writelines(encode_frame(Init(self.spec)))
        try:
            message, _ = await asyncio.wait_for(channel.first(), timeout)
        except TimeoutError:
            await self.kill()
            self._close_channel()
            raise LoadFailed(
                f"the model did not load within {timeout:g}s (startup_timeout_s)"
            ) from None
        except ConnectionError:
            self._close_channel()
            code = await self._process.wait()
            await self._drain_output()
            raise LoadFailed(
                f"the worker exited while loading (exit code {code}); see the log"
            ) from None
        except FrameError as exc:
            message = Failed(f"the worker answered its start with a malformed frame ({exc})")
            await self.kill()
        if not isinstance(message, Ready):
            if not isinstance(message, Failed):
                message = Failed(f"the worker sent {type(message).__name__} instead of ready")
                await self.kill()
            self._close_channel()
            await self._process.wait()
            await self._drain_output()
            raise LoadFailed(message.error, message.permanent)
        self.signature = message.signature
        self.can_explain = message.explain
        channel.start(self._on_frame, self._on_broken)
        self._tasks.append(asyncio.create_task(self._watch_channel(channel)))
        self._log_line(f"worker {self.pid} ready: model loaded in load_s={message.load_s} s")

    async def _drain_output(self) -> None:
        if self._process is not None:
            await self._process.drain_output()

    async def _watch_channel(self, channel: FrameProtocol[FromWorker]) -> None:
        """Wait until the worker's socket closes (it crashed, exited, was killed or sent
        a malformed frame), then fail what it had in flight."""
        try:
            await channel.closed
        finally:
            await self._handle_exit()

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

    def _on_broken(self, exc: FrameError) -> None:
        """A worker that breaks the protocol is not trusted with more work: it is replaced,
        and what it had in flight fails as if it had crashed (`_watch_channel`)."""
        self.exit_reason = "sent a malformed message"
        self._log_line(f"worker {self.pid} sent a malformed frame ({exc}); restarting it")
        self.doomed = True
        if self._process is not None:
            self._process.kill()
        self._close_channel()

    def _close_channel(self) -> None:
        """Close our end of the socketpair explicitly.

        A transport left to the garbage collector closes its file descriptor a
        second time from the socket object; by then the number may belong to a
        client's TCP connection, which would be cut (uvloop#645/#738).
        """
        self._poller = None  # its descriptor number may be reused once closed
        if self._writer is not None and not self._writer.is_closing():
            self._writer.close()

    async def _handle_exit(self) -> None:
        self._close_channel()
        code = await self._process.wait() if self._process else None
        if self._process is not None and self._process.oom_killed():
            self.exit_reason = self.exit_reason or "ran out of memory (compute.mem)"
            self.oom = True
        self.exit_reason = self.exit_reason or describe_exit(code)
        oldest = self._oldest()
        for batch_id in list(self._pending):
            sent = self._settle(batch_id)
            if sent is None or sent.future.done():
                continue
            if batch_id == oldest:  # it ran: only the client may decide to send it again
                sent.future.set_exception(
                    Unavailable(
                        f"the worker of API '{self.spec.api}' {self.exit_reason} before "
                        f"answering; it is being restarted, retry shortly",
                        retry_after=1,
                    )
                )
            else:
                sent.future.set_exception(self._not_started())
        for stream in self._streams.values():
            stream.put_nowait(None)
        self.exited.set()
        if self._on_exit is not None and not self.stopping:
            await self._on_exit(self)

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
        sent = _Sent(future, len(requests), on_done)
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
        queue: asyncio.Queue[_StreamEvent] = asyncio.Queue()
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

    async def stop(self, grace: float = 10.0) -> None:
        """Let requests in flight finish, then close the socket so the worker exits."""
        self.stopping = True
        if self._pending:
            await asyncio.wait([sent.future for sent in self._pending.values()], timeout=grace)
        if self._writer is not None:
            self._writer.close()
        if self._process is not None:
            try:
                await asyncio.wait_for(self._process.wait(), timeout=grace)
            except TimeoutError:
                await self.kill()
        for task in self._tasks:
            try:
                await asyncio.wait_for(task, timeout=1)
            except (TimeoutError, asyncio.CancelledError):
                task.cancel()

    def memory_bytes(self) -> int | None:
        """The worker's memory (its cgroup's charge, else its process tree's PSS)."""
        return self._process.memory_bytes() if self._process else None

    def over_memory(self, limit: int | None) -> str | None:
        """Why the worker is over `limit` (compute.mem), else None: the watchdog, a second
        line behind the kernel's limit (see WorkerProcess.over_memory)."""
        return self._process.over_memory(limit) if self._process else None

    def cpu_seconds(self) -> float | None:
        """CPU time the worker has used so far (for `target_cpu_utilization`)."""
        return self._process.cpu_seconds() if self._process else None

    async def kill(self, reason: str | None = None) -> None:
        if reason:
            self.exit_reason = reason
        if self._process is not None and self._process.returncode is None:
            self._process.kill()
            await self._process.wait()
