"""The server-wide sandbox decision and the pieces every worker's spec shares.

`SandboxPolicy` is made once by the server (`kiln server`: on unless
--unsafe-no-sandbox; `kiln serve`: off unless --sandbox) and asked for one
LaunchSpec per worker. It knows which folders the Python runtime needs, which
uid a tenant runs as, and the minimal environment a worker starts from.
"""

from __future__ import annotations

import functools
import os
import site
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from kiln.sandbox.identity import uid_for
from kiln.sandbox.probe import Capabilities, probe, require
from kiln.sandbox.spec import LaunchSpec, Limits

SANDBOX_TMP = "/tmp"  # the worker's scratch inside the sandbox (a tmpfs of its own)


@functools.cache
def python_paths() -> tuple[str, ...]:
    """Folders the interpreter and Kiln's own packages live in (bound read-only).

    The installation (base prefix), the virtualenv, their site-packages and the
    folders that `.pth` files add (an editable install's `src/`). Never the
    server's working directory, which `python -m` puts on sys.path.
    """
    paths = {sys.base_prefix, sys.prefix, os.path.dirname(os.path.realpath(sys.executable))}
    paths.update(sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib"))
    sites = [*site.getsitepackages(), site.getusersitepackages()]
    paths.update(s for s in sites if os.path.isdir(s))
    for folder in sites:
        if not os.path.isdir(folder):
            continue
        for name in os.listdir(folder):
            if not name.endswith(".pth"):
                continue
            try:
                lines = Path(folder, name).read_text().splitlines()
            except OSError:
                continue
            paths.update(
                line.strip()
                for line in lines
                if line.strip()
                and not line.startswith(("#", "import"))
                and os.path.isdir(line.strip())
            )
    import kiln

    paths.add(str(Path(kiln.__file__).resolve().parent.parent))
    return tuple(sorted(p for p in paths if p and p != "/" and os.path.exists(p)))


def base_env() -> dict[str, str]:
    """The environment every worker starts from: nothing of the server's own.

    HOME and TMPDIR are the sandbox's private /tmp (a tmpfs per worker); only an
    unsandboxed worker (`--unsafe-no-sandbox`) shares the machine's /tmp.
    """
    python_bin = os.path.dirname(sys.executable)
    home = SANDBOX_TMP
    return {
        "PATH": os.pathsep.join([python_bin, "/usr/local/bin", "/usr/bin", "/bin"]),
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "HOME": home,
        "TMPDIR": home,
        "PYTHONDONTWRITEBYTECODE": "1",
    }


@dataclass
class SandboxPolicy:
    """Whether workers are sandboxed on this server, and how."""

    enabled: bool
    home: Path | None = None
    inherit_env: bool = False  # `kiln serve` without --sandbox: the developer's environment

    def __post_init__(self) -> None:
        # Asked for, the sandbox must be there now; off, nothing is probed until used.
        self._caps: Capabilities | None = require() if self.enabled else None

    @property
    def caps(self) -> Capabilities:
        return self._caps or probe()

    def launch(
        self,
        argv: list[str],
        env: dict[str, str],
        *,
        cwd: str,
        pass_fds: tuple[int, ...],
        tenant: str = "",
        read_only: list[str] | None = None,
        writable: list[str] | None = None,
        devices: list[str] | None = None,
        network: str = "none",
        limits: Limits | None = None,
        name: str = "worker",
    ) -> LaunchSpec:
        uid = None
        if self.enabled and self.caps.per_tenant_uids and self.home is not None:
            uid = uid_for(self.home, tenant)
        return LaunchSpec(
            argv=argv,
            env=env,
            cwd=cwd,
            pass_fds=pass_fds,
            sandboxed=self.enabled,
            tenant=tenant,
            uid=uid,
            gid=uid,
            read_only=[*python_paths(), cwd, *(read_only or [])],
            writable=list(writable or []),
            devices=list(devices or []),
            network=network,
            limits=limits or Limits(),
            name=name,
        )
