"""One worker process, started from a LaunchSpec: spawn, output, memory, exit.

Shared by realtime replicas (replica.py) and batch workers (batch/job.py), so
both close every descriptor but their channel, both run in the sandbox the
spec asks for, and both read worker output the same way: in chunks, with
lines capped, so a handler printing a 300 KB line cannot stop the log or wedge
the worker (asyncio's readline gives up past 64 KiB).

Workers start in a session of their own: a signal sent to the server's process
group (Ctrl-C, or systemd's SIGTERM) does not reach them, nor a sandboxed
worker's bubblewrap (whose death would take the worker with it). The server
decides when a worker stops: it drains, closes the channel (the worker exits on
EOF) and SIGKILLs what is left after the grace period. Workers also ignore
SIGINT and SIGTERM themselves, for the signal sent to each process one by one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable
from pathlib import Path

from kiln.sandbox.launch import Prepared, prepare
from kiln.sandbox.spec import EXIT_OUT_OF_MEMORY, LaunchSpec

MAX_LINE_BYTES = 16 * 1024  # longer lines are cut, with a note of how much
READ_CHUNK = 64 * 1024


class WorkerProcess:
    def __init__(self, spec: LaunchSpec, log_line: Callable[[str], None]) -> None:
        self.spec = spec
        self._log_line = log_line
        self._process: asyncio.subprocess.Process | None = None
        self._prepared: Prepared | None = None
        self.pump: asyncio.Task[None] | None = None
        self._oom = False

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    @property
    def returncode(self) -> int | None:
        return self._process.returncode if self._process else None

    async def spawn(self) -> None:
        self._prepared = await asyncio.to_thread(prepare, self.spec)
        try:
            self._process = await asyncio.create_subprocess_exec(
                *self._prepared.argv,
                pass_fds=self.spec.pass_fds,
                close_fds=True,
                cwd=self.spec.cwd,
                env=self.spec.env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,  # out of the server's process group (see above)
            )
        except BaseException:
            self._remove_group()
            raise
        self.pump = asyncio.create_task(self._pump_output())

    async def _pump_output(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        stream = self._process.stdout
        pending = bytearray()
        cut = 0
        while chunk := await stream.read(READ_CHUNK):
            start = 0
            while (end := chunk.find(b"\n", start)) >= 0:
                self._emit(pending, chunk[start:end], cut)
                pending, cut, start = bytearray(), 0, end + 1
            rest = chunk[start:]
            room = MAX_LINE_BYTES - len(pending)
            pending += rest[:room]
            cut += max(0, len(rest) - room)
        if pending or cut:
            self._emit(pending, b"", cut)

    def _emit(self, pending: bytearray, tail: bytes, cut: int) -> None:
        room = MAX_LINE_BYTES - len(pending)
        line = bytes(pending) + tail[: max(0, room)]
        cut += max(0, len(tail) - max(0, room))
        text = line.decode("utf-8", "replace")
        if cut:
            text += f" ... [{cut} more bytes of this line not logged]"
        self._log_line(text)

    async def wait(self) -> int:
        """The exit code, a signal as -n (bubblewrap's own 128 + n is translated)."""
        assert self._process is not None
        code = await self._process.wait()
        if self.spec.sandboxed and code > 128:
            code = -(code - 128)
        prepared = self._prepared
        group = prepared.group if prepared else None
        if prepared is not None and group is not None:
            if not self._oom:
                self._oom = group.oom_kills() > 0  # read before the group is removed
            prepared.group = None  # removed once, off the event loop
            await asyncio.to_thread(group.remove)
        return code

    async def stop(self, grace: float) -> int | None:
        """Wait up to `grace` for the worker to exit, then SIGKILL it; the exit code.

        The caller first asks it to stop by closing its channel (workers ignore
        SIGTERM, so a signal would not do: see the module docstring)."""
        if self._process is None:
            return None
        try:
            await asyncio.wait_for(self._process.wait(), timeout=grace)
        except TimeoutError:
            self.kill()
        return await self.wait()

    def kill(self) -> None:
        if self._process is not None and self._process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._process.pid, signal.SIGKILL)

    async def drain_output(self, timeout: float = 1.0) -> None:
        if self.pump is not None:
            await asyncio.wait([self.pump], timeout=timeout)

    def memory_bytes(self) -> int | None:
        """The worker's memory: its cgroup's charge, else the proportional set size (PSS)
        of its process tree. Not RSS: forked children share their parent's pages, and a
        sum of RSS counts each shared page once per process (a fork of 1,000 read as 6 GiB
        of a 2 GiB limit), where PSS splits every page among the processes sharing it."""
        group = self._prepared.group if self._prepared else None
        if group is not None:
            return group.memory_bytes()
        if not self.pid:
            return None
        return _tree_sum(self.pid, "smaps_rollup", _pss_bytes)

    def over_memory(self, limit: int | None) -> str | None:
        """Why the worker must go, when it uses more than `limit` bytes (compute.mem):
        the watchdog behind the kernel's limit, shared by realtime replicas and batch
        workers so both say it the same way; None when it is within the limit."""
        if not limit:
            return None
        used = self.memory_bytes()
        if used is None or used <= limit:
            return None
        return f"used {used / 2**20:.0f} MiB, over its compute.mem of {limit / 2**20:.0f} MiB"

    def cpu_seconds(self) -> float | None:
        """CPU time (user + system) the worker has used so far: its cgroup's usage,
        else the sum over its process tree (what `target_cpu_utilization` compares)."""
        group = self._prepared.group if self._prepared else None
        if group is not None:
            used = _group_cpu_seconds(group.folders, group.version)
            if used is not None:
                return used
        if not self.pid:
            return None
        ticks = _tree_sum(self.pid, "stat", _stat_cpu_ticks)
        return None if ticks is None else ticks / _CLOCK_TICKS

    def oom_killed(self) -> bool:
        """Whether the worker ran out of memory: the kernel killed a process of it at
        its cgroup's limit, or it exited with EXIT_OUT_OF_MEMORY on a MemoryError."""
        group = self._prepared.group if self._prepared else None
        if group is not None and not self._oom and self.returncode is None:
            self._oom = group.oom_kills() > 0
        return self._oom or self.returncode == EXIT_OUT_OF_MEMORY

    def _remove_group(self) -> None:
        group = self._prepared.group if self._prepared else None
        if group is not None:
            group.remove()


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _tree_sum(pid: int, name: str, read: Callable[[str], int]) -> int | None:
    """`read(text of /proc/<p>/<name>)` summed over a process and its descendants
    (bubblewrap puts the worker two levels down); None when the process is gone."""
    total, todo, seen = 0, [pid], set()
    found = False
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        try:
            with open(f"/proc/{current}/{name}") as f:
                total += read(f.read())
            found = True
            with open(f"/proc/{current}/task/{current}/children") as f:
                todo.extend(int(c) for c in f.read().split())
        except (OSError, ValueError, IndexError):
            continue
    return total if found else None


def _pss_bytes(text: str) -> int:
    """The `Pss:` line of /proc/<pid>/smaps_rollup (in kB), in bytes."""
    for line in text.splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    raise ValueError("no Pss line")


def _stat_cpu_ticks(text: str) -> int:
    """utime + stime (fields 14 and 15) from the text of /proc/<pid>/stat.

    Field 2, the command name, is in parentheses and may hold spaces: fields are
    counted from after its closing parenthesis, where field 3 starts."""
    fields = text.rsplit(")", 1)[1].split()
    return int(fields[14 - 3]) + int(fields[15 - 3])


def _group_cpu_seconds(folders: list[Path], version: str) -> float | None:
    """The cgroup's CPU usage: v2 cpu.stat usage_usec, v1 cpuacct.usage (ns)."""
    try:
        if version == "v2":
            for line in (folders[0] / "cpu.stat").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "usage_usec":
                    return int(value) / 1e6
            return None
        for folder in folders:
            usage = folder / "cpuacct.usage"
            if usage.exists():
                return int(usage.read_text()) / 1e9
    except (OSError, ValueError):
        pass
    return None


def describe_exit(code: int | None) -> str:
    """'was killed by SIGKILL', 'exited with code 3' (a code from `WorkerProcess.wait`)."""
    if code is None:
        return "stopped"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"
