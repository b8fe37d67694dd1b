"""A cgroup per worker: memory, process count and CPU weight enforced by the kernel.

cgroup v1 (a folder per controller) and v2 (one unified tree) are both handled;
workers live under a `kiln/` folder of their own. The worker joins its group
before bubblewrap runs (see `join_prefix`), so every process it ever forks is
counted from its first instruction. Where nothing is writable (not root, a
read-only /sys) `writable_version()` says None and the launcher falls back to
rlimits.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from dataclasses import dataclass
from pathlib import Path

from kiln.sandbox.spec import Limits

ROOT = Path("/sys/fs/cgroup")
V1_CONTROLLERS = ("memory", "pids", "cpu")
_serial = itertools.count()


def _v2() -> bool:
    return (ROOT / "cgroup.controllers").is_file()


def _v1_base(controller: str) -> Path:
    return ROOT / controller / "kiln"


def writable_version() -> str | None:
    """ "v1" or "v2" when Kiln can create worker groups here, else None."""
    try:
        if _v2():
            base = ROOT / "kiln"
            base.mkdir(exist_ok=True)
            _enable_v2_controllers(base)
            probe = base / f".probe-{os.getpid()}"
            probe.mkdir(exist_ok=True)
            ok = (probe / "memory.max").exists() and (probe / "pids.max").exists()
            probe.rmdir()
            return "v2" if ok else None
        for controller in V1_CONTROLLERS:
            if not (ROOT / controller).is_dir():
                return None
            base = _v1_base(controller)
            base.mkdir(exist_ok=True)
            probe = base / f".probe-{os.getpid()}"
            probe.mkdir(exist_ok=True)
            probe.rmdir()
        return "v1"
    except OSError:
        return None


def _enable_v2_controllers(base: Path) -> None:
    for folder in (ROOT, base):
        wanted = " ".join(f"+{c}" for c in ("memory", "pids", "cpu"))
        with contextlib.suppress(OSError):
            (folder / "cgroup.subtree_control").write_text(wanted)


@dataclass
class WorkerGroup:
    """One worker's cgroup (one folder per controller on v1)."""

    folders: list[Path]
    version: str

    @property
    def procs_files(self) -> list[str]:
        return [str(f / "cgroup.procs") for f in self.folders]

    def _memory(self) -> Path:
        return self.folders[0]

    def memory_bytes(self) -> int | None:
        name = "memory.current" if self.version == "v2" else "memory.usage_in_bytes"
        try:
            return int((self._memory() / name).read_text())
        except (OSError, ValueError):
            return None

    def oom_kills(self) -> int:
        name = "memory.events" if self.version == "v2" else "memory.oom_control"
        try:
            for line in (self._memory() / name).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        except (OSError, ValueError):
            pass
        return 0

    def remove(self, wait_s: float = 5.0) -> None:
        """Remove the folders once the worker's processes are gone.

        Blocking (call it in a thread): a sandboxed worker's last processes die a
        moment after bubblewrap (PDEATHSIG), so the folder may be busy briefly.
        What is still busy after `wait_s` is left to `sweep_stale` at a later start.
        """
        deadline = time.monotonic() + wait_s
        for folder in self.folders:
            while True:
                try:
                    folder.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.05)


def _bases() -> list[Path]:
    if _v2():
        return [ROOT / "kiln"]
    return [_v1_base(c) for c in V1_CONTROLLERS]


def sweep_stale() -> int:
    """Remove worker groups left by servers that are gone (SIGKILL); how many went.

    A group is named `<name>-<server pid>-<n>`: one whose server pid is not alive
    is stale. A folder with processes in it cannot be removed (EBUSY) and stays.
    """
    removed = 0
    for base in _bases():
        try:
            folders = list(base.iterdir())
        except OSError:
            continue
        for folder in folders:
            parts = folder.name.rsplit("-", 2)
            if len(parts) != 3 or not parts[1].isdigit() or not folder.is_dir():
                continue
            if Path(f"/proc/{parts[1]}").exists():
                continue
            try:
                folder.rmdir()
                removed += 1
            except OSError:
                pass
    return removed


def create(name: str, limits: Limits, version: str) -> WorkerGroup:
    leaf = f"{name}-{os.getpid()}-{next(_serial)}"
    if version == "v2":
        folder = ROOT / "kiln" / leaf
        folder.mkdir()
        if limits.mem_bytes:
            (folder / "memory.max").write_text(str(limits.mem_bytes))
            with contextlib.suppress(OSError):
                (folder / "memory.swap.max").write_text("0")
        if limits.max_pids:
            (folder / "pids.max").write_text(str(limits.max_pids))
        if limits.cpu:
            weight = max(1, min(10000, round(100 * limits.cpu)))
            with contextlib.suppress(OSError):
                (folder / "cpu.weight").write_text(str(weight))
        return WorkerGroup([folder], "v2")
    folders = []
    for controller in V1_CONTROLLERS:
        folder = _v1_base(controller) / leaf
        folder.mkdir()
        folders.append(folder)
    memory, pids, cpu = folders
    if limits.mem_bytes:
        (memory / "memory.limit_in_bytes").write_text(str(limits.mem_bytes))
        with contextlib.suppress(OSError):  # no swap accounting on many kernels
            (memory / "memory.memsw.limit_in_bytes").write_text(str(limits.mem_bytes))
    if limits.max_pids:
        (pids / "pids.max").write_text(str(limits.max_pids))
    if limits.cpu:
        (cpu / "cpu.shares").write_text(str(max(2, round(1024 * limits.cpu))))
    return WorkerGroup(folders, "v1")


def join_prefix(group: WorkerGroup) -> list[str]:
    """A `sh` prefix that moves itself into the group, then execs the rest of the argv.

    A shell (a millisecond) rather than `preexec_fn`, which is unsafe in a
    threaded server.
    """
    script = (
        'for f in "$@"; do case "$f" in --) shift; break;; esac; '
        'echo $$ > "$f"; shift; done; exec "$@"'
    )
    return ["/bin/sh", "-c", script, "sh", *group.procs_files, "--"]
