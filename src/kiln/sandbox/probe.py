"""What this machine offers for sandboxing workers, found once per server.

Checked by doing, not by reading version numbers: bubblewrap is run once with
the namespaces Kiln asks for, and a cgroup folder is created and removed. The
result is logged at start so an operator knows what protects the server.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from dataclasses import dataclass, field

from kiln.sandbox import cgroups

INSTALL_HINT = (
    "install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap; Fedora: dnf install "
    "bubblewrap) and allow user namespaces, or run the server as root"
)


class SandboxUnavailable(RuntimeError):
    """The sandbox was asked for and this machine cannot provide it."""


@dataclass(frozen=True)
class Capabilities:
    bwrap: str | None
    setpriv: str | None
    prlimit: str | None
    root: bool
    namespaces: bool  # bubblewrap ran a command in new mount/pid/net namespaces
    cgroup: str | None  # "v1", "v2" or None (not writable here)
    problems: tuple[str, ...] = field(default=())

    @property
    def available(self) -> bool:
        return self.bwrap is not None and self.namespaces and (not self.root or bool(self.setpriv))

    @property
    def per_tenant_uids(self) -> bool:
        return self.root and self.setpriv is not None

    def describe(self) -> str:
        if not self.available:
            return "sandbox: not available (" + "; ".join(self.problems) + ")"
        who = "a uid per tenant" if self.per_tenant_uids else "the server's uid in a user namespace"
        limits = (
            f"cgroup {self.cgroup} (memory, pids, cpu)"
            if self.cgroup
            else ("rlimits (prlimit)" if self.prlimit else "no kernel limits")
        )
        return f"sandbox: bubblewrap namespaces, {who}, limits by {limits}"


def _try_bwrap(bwrap: str, root: bool) -> str | None:
    """None if bubblewrap can start `true` in the namespaces a worker gets, else why not."""
    argv = [bwrap, "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts"]
    if not root:
        argv.append("--unshare-user")
    argv += ["--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev", "true"]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)  # noqa: S603
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"bubblewrap did not run: {exc}"
    if done.returncode != 0:
        return f"bubblewrap failed: {done.stderr.strip() or done.returncode}"
    return None


@functools.cache
def probe() -> Capabilities:
    problems: list[str] = []
    bwrap = shutil.which("bwrap")
    root = os.geteuid() == 0
    namespaces = False
    if bwrap is None:
        problems.append("bubblewrap (bwrap) is not installed; " + INSTALL_HINT)
    else:
        why = _try_bwrap(bwrap, root)
        namespaces = why is None
        if why:
            problems.append(why)
    setpriv = shutil.which("setpriv")
    if root and setpriv is None:
        problems.append("setpriv (util-linux) is missing: workers cannot drop to a tenant uid")
    cgroup = cgroups.writable_version() if root else None
    if cgroup:
        cgroups.sweep_stale()  # groups of servers that were killed before removing them
    return Capabilities(
        bwrap=bwrap,
        setpriv=setpriv,
        prlimit=shutil.which("prlimit"),
        root=root,
        namespaces=namespaces,
        cgroup=cgroup,
        problems=tuple(problems),
    )


def require() -> Capabilities:
    caps = probe()
    if not caps.available:
        raise SandboxUnavailable(
            "workers cannot be sandboxed on this machine: " + "; ".join(caps.problems)
        )
    return caps
