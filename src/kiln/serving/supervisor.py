"""One replica slot: keeps a worker process alive, restarting it with backoff.

A slot outlives its workers. One backoff covers every way a worker ends: a
crash after a good load (a handler that kills its process on every request), a
SIGKILL, the memory watchdog, a wedged batch, and a load that fails for a reason
that may pass (the model's files are not there yet, a download failed, the load
overran startup_timeout_s). The delay doubles from 0.2 s to 30 s and resets only
once a worker has stayed up for STABLE_AFTER_S, so a worker that loads and then
dies on each request is restarted a handful of times a minute, not twice a second.

A load failure that cannot pass by itself (a SyntaxError, a missing module, a
configuration the runtime refuses: the worker says `permanent`, see
`kiln.serving.worker_load.permanent_load_failure`) leaves the slot `failed` with the
reason and is not retried: only a new deploy (or `kiln serve` restarted) can fix it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

from kiln.serving.replica import LaunchFactory, LoadFailed, Replica
from kiln.serving.types import WorkerSpec

MIN_BACKOFF_S = 0.2
MAX_BACKOFF_S = 30.0
STABLE_AFTER_S = 10.0
MEMORY_CHECK_S = 1.0


class ReplicaSlot:
    def __init__(
        self,
        index: int,
        spec: WorkerSpec,
        *,
        launch: LaunchFactory,
        prepare: Callable[[], Awaitable[None]] | None = None,
        startup_timeout: float,
        mem_limit: int | None,
        log_line: Callable[[str], None],
        on_change: Callable[[], None],
    ) -> None:
        self.index = index
        self.spec = spec
        self._launch = launch
        self._prepare = prepare
        self._startup_timeout = startup_timeout
        self._mem_limit = mem_limit
        self._log_line = log_line
        self._on_change = on_change
        self.replica: Replica | None = None
        self.state = "loading"
        # Why the slot is not serving; after a restart it keeps the last exit's reason
        # until the new worker has stayed up (STABLE_AFTER_S), so `kiln get` can show it.
        self.error: str | None = None
        self.last_exit: str | None = None  # why the last worker ended, kept for good
        self.permanent = False  # failed for a reason no retry can fix
        self.restarts = 0
        self.oom_kills = 0
        self.started_at = 0.0
        self.backoff = 0.0  # the delay before the next restart; 0 until something fails
        self._stopping = False
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def ready(self) -> bool:
        return self.state == "ready" and self.replica is not None and not self.replica.doomed

    async def start(self) -> None:
        """Start the first worker; returns once it is ready or has failed to load."""
        await self._start_once()
        if self.state == "failed" and not self.permanent and not self._stopping:
            self._spawn(self._restart_loop(self._next_delay()))

    def _next_delay(self) -> float:
        self.backoff = min(max(self.backoff * 2, MIN_BACKOFF_S), MAX_BACKOFF_S)
        return self.backoff

    async def _start_once(self) -> None:
        self.state = "loading" if self.restarts == 0 else "restarting"
        replica = Replica(
            self.spec,
            launch=self._launch,
            log_line=self._log_line,
            on_exit=self._on_worker_exit,
        )
        try:
            if self._prepare is not None:
                await self._prepare()  # e.g. the server fetches a sandboxed worker's model
            await replica.start(self._startup_timeout)
        except LoadFailed as exc:
            self.state, self.error = "failed", str(exc)
            self.permanent = bool(getattr(exc, "permanent", False))
            if self.permanent:
                self._log_line(
                    f"replica {self.index} failed to load: {exc} (not retried: this cannot "
                    f"succeed until the code or kiln.yaml changes; fix it and deploy again)"
                )
            else:
                self._log_line(f"replica {self.index} failed to load: {exc}")
            self._on_change()
            return
        if self._stopping:
            await replica.stop(1)
            return
        self.replica = replica
        self.state = "ready"
        if self.restarts == 0:
            self.error = None
        self.started_at = time.monotonic()
        self._spawn(self._settle(replica))
        if self._mem_limit:
            self._spawn(self._watch_memory(replica))
        self._on_change()

    async def _settle(self, replica: Replica) -> None:
        """A worker up for STABLE_AFTER_S has proved itself: forget the backoff."""
        await asyncio.sleep(STABLE_AFTER_S)
        if replica is self.replica and not replica.exited.is_set():
            self.backoff = 0.0
            self.error = None

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _on_worker_exit(self, replica: Replica) -> None:
        if self._stopping or replica is not self.replica:
            return
        self.replica = None
        if replica.oom:
            self.oom_kills += 1
        stable = time.monotonic() - self.started_at >= STABLE_AFTER_S
        if stable:
            self.backoff = 0.0
        delay = 0.0 if stable else self._next_delay()
        self.state = "restarting"
        self.error = self.last_exit = f"worker {replica.exit_reason}"
        when = "now" if not delay else f"in {delay:g}s"
        self._log_line(
            f"replica {self.index}: worker {replica.exit_reason}; restarting it {when} "
            f"(restart {self.restarts + 1})"
        )
        self._on_change()
        self._spawn(self._restart_loop(delay))

    async def _restart_loop(self, delay: float) -> None:
        while not self._stopping:
            if delay:
                await asyncio.sleep(delay)
            if self._stopping:
                return
            self.restarts += 1
            await self._start_once()
            if self.state == "ready" or self.permanent:
                return
            delay = self._next_delay()

    async def _watch_memory(self, replica: Replica) -> None:
        while not replica.exited.is_set() and not self._stopping:
            why = replica.over_memory(self._mem_limit)
            if why is not None:
                self.oom_kills += 1
                await replica.kill(why)
                return
            await asyncio.sleep(MEMORY_CHECK_S)

    async def stop(self, grace: float) -> None:
        self._stopping = True
        self.state = "stopped"
        for task in list(self._tasks):
            task.cancel()
        if self.replica is not None:
            await self.replica.stop(grace)
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
