"""The server's handle on one worker process: spawn it, notice its death, stop it.

What the worker is running (requests written to its socket and matched to their
answers, streams, deadlines) is `ReplicaTraffic`'s (replica_traffic.py), mixed
in here. When the socket closes (the worker crashed, was killed or exited) the
frame it was running fails with 503 and the later ones with `NotStarted`, which
the dispatcher turns back into queued requests; the owner decides whether to
start a new worker.
"""

from __future__ import annotations

import asyncio
import itertools
import select
import socket
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from kiln.errors import Unavailable
from kiln.sandbox.spec import LaunchSpec
from kiln.serving.ipc import FrameError, FrameProtocol, encode_frame
from kiln.serving.messages import (
    FROM_WORKER,
    Failed,
    FromWorker,
    Init,
    Ready,
)
from kiln.serving.polling import for_limit
from kiln.serving.process import WorkerProcess, describe_exit
from kiln.serving.replica_traffic import ReplicaTraffic, SentBatch, StreamEvent
from kiln.serving.types import WorkerSpec

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


class Replica(ReplicaTraffic):
    """One worker process serving one API version: its process; what it runs is
    `ReplicaTraffic`'s (replica_traffic.py)."""

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
        self._pending: dict[int, SentBatch] = {}
        self._streams: dict[int, asyncio.Queue[StreamEvent]] = {}
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
