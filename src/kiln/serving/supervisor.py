"""One replica slot: keeps a worker process alive, restarting it with backoff.

A slot outlives its workers. When a worker dies (crash, SIGKILL, the memory
watchdog, a wedged batch) the slot starts another after a backoff that doubles
from 0.2 s to 30 s and resets once a worker has stayed up. A worker that fails
to *load* leaves the slot `failed` with the error; the slot keeps retrying in
the background, so a model whose files appear later comes up by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

from kiln.serving.replica import LaunchFactory, LoadFailed, Replica
from kiln.serving.types import WorkerSpec

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
        self.error: str | None = None
        self.restarts = 0
        self.oom_kills = 0
        self.started_at = 0.0
        self._stopping = False
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def ready(self) -> bool:
        return self.state == "ready" and self.replica is not None and not self.replica.doomed

    async def start(self) -> None:
        """Start the first worker; returns once it is ready or has failed to load."""
        await self._start_once()
        if self.state == "failed" and not self._stopping:
            self._spawn(self._restart_loop(first_delay=1.0))

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
            self._log_line(f"replica {self.index} failed to load: {exc}")
            self._on_change()
            return
        if self._stopping:
            await replica.stop(1)
            return
        self.replica = replica
        self.state, self.error = "ready", None
        self.started_at = time.monotonic()
        if self._mem_limit:
            self._spawn(self._watch_memory(replica))
        self._on_change()

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
        self.state = "restarting"
        self.error = f"worker {replica.exit_reason}"
        self._log_line(f"replica {self.index}: worker {replica.exit_reason}; restarting it")
        self._on_change()
        stable = time.monotonic() - self.started_at > STABLE_AFTER_S
        self._spawn(self._restart_loop(first_delay=0.0 if stable else 0.2))

    async def _restart_loop(self, first_delay: float) -> None:
        delay = first_delay
        while not self._stopping:
            if delay:
                await asyncio.sleep(delay)
            if self._stopping:
                return
            self.restarts += 1
            await self._start_once()
            if self.state == "ready":
                return
            delay = min(max(delay * 2, 0.2), MAX_BACKOFF_S)

    async def _watch_memory(self, replica: Replica) -> None:
        while not replica.exited.is_set() and not self._stopping:
            rss = replica.rss_bytes()
            if rss is not None and self._mem_limit and rss > self._mem_limit:
                mib = self._mem_limit / 2**20
                self.oom_kills += 1
                await replica.kill(
                    f"used {rss / 2**20:.0f} MiB, over its compute.mem of {mib:.0f} MiB"
                )
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
