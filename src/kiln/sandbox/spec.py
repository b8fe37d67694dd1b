"""The launch spec: everything about how a worker process starts, as plain data.

One spec for realtime and batch workers (and, later, a Ray replica's Kiln
worker), so the boundary between the platform and user code is decided in one
place and applied in one place (`serving/process.py`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field


def default_max_pids() -> int:
    """Tasks (processes and threads) per worker: enough for thread pools sized by the
    machine's cores (TensorFlow, onnxruntime, BLAS: a few per core), never a thousand."""
    return min(900, 256 + 16 * (os.cpu_count() or 1))


DEFAULT_MAX_PIDS = default_max_pids()
DEFAULT_TMP_BYTES = 1 << 30  # the worker's /tmp (scratch, HOME) when sandboxed

# A worker that hit its memory limit as a MemoryError (rlimits, where no cgroup
# could be made) exits with this code, so the server reports it as the kernel's
# OOM kill would be reported: "ran out of memory (compute.mem)".
EXIT_OUT_OF_MEMORY = 3


@dataclass
class Limits:
    """Kernel-enforced bounds for one worker (None: no bound)."""

    mem_bytes: int | None = None  # compute.mem
    max_pids: int | None = DEFAULT_MAX_PIDS
    cpu: float | None = None  # compute.cpu -> CPU weight
    tmp_bytes: int = DEFAULT_TMP_BYTES


@dataclass
class LaunchSpec:
    """How to start one worker.

    `argv` runs inside the sandbox at the same paths as outside: every bound
    folder keeps its path, so specs and messages need no translation.
    """

    argv: list[str]
    env: dict[str, str]
    cwd: str
    pass_fds: tuple[int, ...] = ()
    sandboxed: bool = False
    tenant: str = ""  # "" for the admin's deployments and `kiln serve`
    uid: int | None = None  # run as this uid (the server must be root)
    gid: int | None = None
    read_only: list[str] = field(default_factory=list)  # files and folders visible, read-only
    writable: list[str] = field(default_factory=list)  # e.g. a batch job's output folder
    devices: list[str] = field(default_factory=list)  # /dev/nvidia0 ...
    network: str = "none"  # "none": loopback only; "egress": the host's network
    limits: Limits = field(default_factory=Limits)
    name: str = "worker"  # for the cgroup and messages: <api>-<replica>
