"""A LaunchSpec as a bubblewrap command line.

The sandbox starts from an empty root. Everything the worker may read is bound
read-only at its own path; parents of binds are created 0755 inside, so a
Python installed under /root (0700 outside) is reachable by a tenant uid while
/root's other contents do not exist. See docs/architecture.md, "Where user code
runs".
"""

from __future__ import annotations

import os
from pathlib import Path

from kiln.sandbox.probe import Capabilities
from kiln.sandbox.spec import LaunchSpec

# /etc files a Python worker may need; none holds a secret.
ETC_FILES = (
    "/etc/ld.so.cache",
    "/etc/ssl",
    "/etc/ca-certificates",
    "/etc/pki",
    "/etc/localtime",
    "/etc/passwd",
    "/etc/group",
    "/etc/nsswitch.conf",
    "/etc/hosts",
    "/etc/mime.types",
)
NETWORK_ETC = ("/etc/resolv.conf", "/etc/gai.conf")
SYSTEM_RO = ("/usr", "/opt/conda", "/sys/devices/system/cpu", "/etc/alternatives")
GPU_SHARED = ("/dev/nvidiactl", "/dev/nvidia-uvm", "/dev/nvidia-uvm-tools")


def _inside(path: str, folders: set[str]) -> bool:
    return any(path == f or path.startswith(f.rstrip("/") + "/") for f in folders)


def _parents(path: str, made: set[str], bound: set[str]) -> list[str]:
    """`--dir` for each missing parent, 0755, unless it already exists through a bind."""
    args: list[str] = []
    parts = Path(path).parent.parts
    for i in range(2, len(parts) + 1):
        folder = str(Path(*parts[:i]))
        if folder not in made and not _inside(folder, bound):
            made.add(folder)
            args += ["--perms", "0755", "--dir", folder]
    return args


def _bind(flag: str, path: str, made: set[str], bound: set[str]) -> list[str]:
    args = [*_parents(path, made, bound), flag, path, path]
    bound.add(path)
    return args


def _outermost(paths: list[str]) -> list[str]:
    """Existing absolute paths, without those already inside another one."""
    keep: list[str] = []
    for path in sorted({os.path.abspath(p) for p in paths if os.path.exists(p)}, key=len):
        if not _inside(path, set(keep)):
            keep.append(path)
    return keep


def command(spec: LaunchSpec, caps: Capabilities) -> list[str]:
    """The argv that runs `spec.argv` sandboxed (bwrap [+ setpriv] + argv)."""
    assert caps.bwrap is not None
    argv = [caps.bwrap, "--die-with-parent", "--new-session"]
    argv += ["--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
    if spec.network != "egress":
        argv.append("--unshare-net")
    if not caps.root:
        argv += ["--unshare-user", "--disable-userns"]
    # /tmp, /proc and /dev first: later binds may sit inside them (a revision under /tmp).
    argv += ["--proc", "/proc", "--dev", "/dev"]
    argv += ["--size", str(spec.limits.tmp_bytes), "--perms", "1777", "--tmpfs", "/tmp"]
    argv += ["--size", str(64 << 20), "--perms", "1777", "--tmpfs", "/dev/shm"]
    made: set[str] = {"/", "/tmp", "/proc", "/dev"}
    bound: set[str] = set()
    # Merged /usr (Debian 12+, Fedora): /bin, /lib... are links into /usr.
    for top in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        link = Path("/") / top
        if link.is_symlink():
            argv += ["--symlink", os.readlink(link), str(link)]
        elif link.is_dir():
            argv += ["--ro-bind", str(link), str(link)]
            made.add(str(link))
    etc = ETC_FILES + (NETWORK_ETC if spec.network == "egress" else ())
    for path in _outermost([*SYSTEM_RO, *etc, *spec.read_only]):
        argv += _bind("--ro-bind", path, made, bound)
    for path in _outermost(spec.writable):
        argv += _bind("--bind", path, made, bound)
    for device in [*spec.devices, *(GPU_SHARED if spec.devices else ())]:
        if os.path.exists(device):
            argv += ["--dev-bind", device, device]
    argv += ["--chdir", spec.cwd]
    if spec.uid is not None and caps.per_tenant_uids:
        assert caps.setpriv is not None
        gid = spec.gid if spec.gid is not None else spec.uid
        argv += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--"]
        argv += [caps.setpriv, f"--reuid={spec.uid}", f"--regid={gid}", "--clear-groups"]
        argv += ["--inh-caps=-all", "--bounding-set=-all", "--no-new-privs"]
    else:
        argv.append("--")
    return argv + spec.argv
