"""Turn a LaunchSpec into the argv, environment and cgroup that start it.

Kept apart from the asyncio process handling (serving/process.py) so the same
decision can be reused by any backend that starts a Kiln worker.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from kiln.sandbox import bwrap, cgroups
from kiln.sandbox.probe import Capabilities, probe
from kiln.sandbox.spec import LaunchSpec


@dataclass
class Prepared:
    argv: list[str]
    group: cgroups.WorkerGroup | None


def prepare(spec: LaunchSpec, caps: Capabilities | None = None) -> Prepared:
    """The argv to exec and the worker's cgroup (None where cgroups are not writable).

    Limits apply with or without the sandbox: a cgroup when this machine lets
    Kiln make one, else rlimits through `prlimit` (RLIMIT_DATA rather than AS,
    which onnxruntime's and TensorFlow's address-space reservations would hit).
    """
    caps = caps or probe()
    argv = bwrap.command(spec, caps) if spec.sandboxed else list(spec.argv)
    if spec.sandboxed and spec.uid is not None and caps.per_tenant_uids:
        for folder in spec.writable:  # e.g. a batch job's output folder, made by the server
            os.chown(folder, spec.uid, spec.gid if spec.gid is not None else spec.uid)
    group = None
    limits = spec.limits
    if caps.cgroup:
        group = cgroups.create(spec.name, limits, caps.cgroup)
        return Prepared(cgroups.join_prefix(group) + argv, group)
    if caps.prlimit and (limits.mem_bytes or (limits.max_pids and spec.sandboxed)):
        prefix = [caps.prlimit]
        if limits.mem_bytes:
            prefix.append(f"--data={limits.mem_bytes}")
        if limits.max_pids and spec.sandboxed:  # per uid: only meaningful in the sandbox
            prefix.append(f"--nproc={limits.max_pids}")
        argv = [*prefix, "--", *argv]
    return Prepared(argv, group)
