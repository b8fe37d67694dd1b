"""Environments on disk: one folder per key under KILN_HOME, built once, shared, pruned.

Layout (`KILN_ENVS_DIR`, else `$KILN_HOME/envs`, else `~/.kiln/envs`):

    <key>/env.json      what it is: requirements, Kiln and Python, packages installed;
                        its modification time is the environment's last use
    <key>/site/         the installed packages (only those the server lacked); this is
                        the one folder a worker puts on sys.path
    .locks/<key>.build  flock: exclusive while one process builds <key>
    .locks/<key>.use    flock: shared by every server process that serves from <key>,
                        for the rest of its life; pruning needs it exclusively
    .tmp/               builds in progress (same disk: the finished folder is renamed in)

A build happens in `.tmp/` and is renamed into place, so a reader sees a whole
environment or none; two deploys with the same key queue on the build lock and
the second finds the first one's result.
"""

from __future__ import annotations

import builtins
import contextlib
import fcntl
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from kiln.environments.installer import BuildFailed, install, missing_packages, source_options
from kiln.environments.requirements import (
    Requirements,
    interpreter_tag,
    kiln_version,
    project_requirements,
)
from kiln.environments.server_packages import write_constraints

MANIFEST = "env.json"
STALE_BUILD_S = 3600.0  # well past uv's own timeout (installer.UV_TIMEOUT_S)
SITE = "site"

Progress = Callable[[str], None]


def envs_dir() -> Path:
    """Where environments live: KILN_ENVS_DIR, else $KILN_HOME/envs, else ~/.kiln/envs."""
    if os.environ.get("KILN_ENVS_DIR"):
        return Path(os.environ["KILN_ENVS_DIR"]).expanduser()
    home = os.environ.get("KILN_HOME") or Path.home() / ".kiln"
    return Path(home).expanduser() / "envs"


@dataclass
class Environment:
    """A built environment: where it is, and what it added to the server's packages."""

    key: str
    path: Path
    packages: list[str] = field(default_factory=list)
    built: bool = False  # this call built it (False: an existing one was reused)
    seconds: float = 0.0  # how long this call took to build or find it
    freed: int = 0  # bytes, once pruned

    @property
    def site_dirs(self) -> list[str]:
        """Folders a worker adds to sys.path: none when the server had every package."""
        site = self.path / SITE
        return [str(site)] if self.packages and site.is_dir() else []

    @property
    def size(self) -> int:
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())

    @property
    def last_used(self) -> float:
        try:
            return (self.path / MANIFEST).stat().st_mtime
        except OSError:
            return 0.0

    @property
    def manifest(self) -> dict:
        try:
            return orjson.loads((self.path / MANIFEST).read_bytes())
        except (OSError, orjson.JSONDecodeError):
            return {}


class Environments:
    """The environment cache of one machine (thread-safe; shared by processes via flocks)."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or envs_dir()
        self._leases: dict[str, int] = {}  # key -> fd holding `.use` shared, for our lifetime
        self._mutex = threading.Lock()

    # ---- looking up and building ---------------------------------------------------
    def lookup(self, project_root: Path) -> Environment | None:
        """The project's environment if it is built (never builds); None if it has none."""
        requirements = project_requirements(project_root)
        if requirements is None:
            return None
        return self._load(requirements.key)

    def ensure(
        self, project_root: Path, progress: Progress | None = None, *, restricted: bool = False
    ) -> Environment | None:
        """The project's environment, built now if it does not exist; None if it needs none.

        Blocking (runs uv): call it from a thread. Raises `BuildFailed` with uv's message.
        The environment is leased to this process for its lifetime, so `kiln cache prune`
        leaves it alone while this server may start workers from it.

        `restricted` is for a user's deploy on a shared server: wheels only (building an
        sdist runs the package's setup code in the server, outside any worker sandbox),
        and no package sources of the user's own (see `Requirements.problems`).
        """
        requirements = project_requirements(project_root)
        if requirements is None:
            return None
        problems = requirements.problems(restricted)
        if problems:
            raise BuildFailed(
                f"{requirements.names} asks for what this server does not install:\n  "
                + "\n  ".join(problems[:10])
            )
        say = progress or (lambda _message: None)
        started = time.monotonic()
        env = self._reuse(requirements.key)
        if env is None:
            with self._locked(requirements.key, "build"):
                env = self._reuse(requirements.key)
                if env is None:
                    env = self._build(requirements, say, restricted)
        env.seconds = time.monotonic() - started
        return env

    def _reuse(self, key: str) -> Environment | None:
        """An existing environment, leased and marked used; None if it is not there."""
        if not (self.root / key / MANIFEST).is_file():
            return None
        self._lease(key)
        env = self._load(key)  # re-read under the lease: a prune may have just removed it
        if env is not None:
            with contextlib.suppress(OSError):
                os.utime(env.path / MANIFEST)
        return env

    def _load(self, key: str) -> Environment | None:
        path = self.root / key
        try:
            manifest = orjson.loads((path / MANIFEST).read_bytes())
        except (OSError, orjson.JSONDecodeError):
            return None
        return Environment(key, path, list(manifest.get("packages") or []))

    def _build(self, requirements: Requirements, say: Progress, restricted: bool) -> Environment:
        key = requirements.key
        say(f"building Python environment {key[:12]} from {requirements.names}")
        started = time.monotonic()
        tmp_root = self.root / ".tmp"
        tmp_root.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f"{key}-", dir=tmp_root))
        try:
            constraints = write_constraints(work / "server-constraints.txt")
            files = list(requirements.files)
            pins = missing_packages(files, constraints, files[0].parent, restricted)
            staged = work / "env"
            (staged / SITE).mkdir(parents=True)
            if pins:
                install(pins, source_options(files), staged / SITE, say, restricted)
            manifest = {
                "key": key,
                "created": time.time(),
                "build_s": round(time.monotonic() - started, 3),
                "kiln": kiln_version(),
                "python": interpreter_tag(),
                "requirement_files": requirements.names,
                "requirements": requirements.text,
                "packages": pins,
            }
            (staged / MANIFEST).write_bytes(orjson.dumps(manifest, option=orjson.OPT_INDENT_2))
            self._lease(key)  # before it is visible, so no prune can take it from under us
            final = self.root / key
            if final.exists():  # left by a crash between rename and manifest: replace it
                shutil.rmtree(final, ignore_errors=True)
            os.rename(staged, final)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return Environment(key, final, pins, built=True)

    # ---- leases and locks ------------------------------------------------------------
    def _lock_path(self, key: str, kind: str) -> Path:
        locks = self.root / ".locks"
        locks.mkdir(parents=True, exist_ok=True)
        return locks / f"{key}.{kind}"

    @contextlib.contextmanager
    def _locked(self, key: str, kind: str) -> Iterator[None]:
        fd = os.open(self._lock_path(key, kind), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _lease(self, key: str) -> None:
        with self._mutex:
            if key in self._leases:
                return
            fd = os.open(self._lock_path(key, "use"), os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(fd, fcntl.LOCK_SH)
            self._leases[key] = fd

    # ---- listing and pruning ---------------------------------------------------------
    def list(self) -> list[Environment]:
        """Every built environment, least recently used first."""
        if not self.root.is_dir():
            return []
        found = [
            env
            for path in self.root.iterdir()
            if not path.name.startswith(".") and (env := self._load(path.name)) is not None
        ]
        return sorted(found, key=lambda e: e.last_used)

    def in_use(self, key: str) -> bool:
        """Whether a running server holds the environment (it may start workers from it)."""
        if key in self._leases:
            return True
        fd = os.open(self._lock_path(key, "use"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    def _clear_stale_builds(self, now: float) -> None:
        """Builds a killed server left in `.tmp/` (a live build is younger than uv's timeout)."""
        tmp = self.root / ".tmp"
        for work in tmp.iterdir() if tmp.is_dir() else []:
            with contextlib.suppress(OSError):
                if now - work.stat().st_mtime > STALE_BUILD_S:
                    shutil.rmtree(work, ignore_errors=True)

    def prune(
        self, *, everything: bool = False, older_than: float | None = None
    ) -> tuple[builtins.list[Environment], builtins.list[Environment]]:
        """Remove environments (all, or unused for `older_than` seconds) no server holds.

        Returns (removed, kept because in use). Everything removed can be built again
        by the next deploy that needs it.
        """
        removed, busy = [], []
        now = time.time()
        self._clear_stale_builds(now)
        for env in self.list():
            if not everything and (older_than is None or now - env.last_used < older_than):
                continue
            fd = os.open(self._lock_path(env.key, "use"), os.O_RDWR | os.O_CREAT, 0o644)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    busy.append(env)
                    continue
                env.freed = env.size
                shutil.rmtree(env.path, ignore_errors=True)
                removed.append(env)
            finally:
                os.close(fd)
        return removed, busy
