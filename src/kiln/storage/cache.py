"""The model cache: one local copy per (model path, remote version), shared and bounded.

Layout under the cache folder (`KILN_CACHE_DIR`, else `$KILN_HOME/cache`, else
`~/.kiln/cache`):

    blobs/<sha256>        every downloaded file, named by the SHA-256 of its bytes
    models/<key>/...      the model as the runtime sees it: hard links into blobs/
                          (file names kept), or an unpacked archive
    entries/<key>.json    what <key> is: model path, remote identity, size; its
                          modification time is the entry's last use
    entries/<key>.lock    flock: shared while a process uses the model, exclusive
                          while one downloads it or evicts it
    tmp/                  downloads in progress (same disk, so a rename publishes)
    cache.lock            flock: exclusive while entries are evicted

`<key>` hashes the model path with the store's identity of its bytes (ETag,
generation, version id, size), so a changed object gets a new entry and an
unchanged one is found without downloading. Replicas starting together queue
on the entry's lock: the first downloads, the others find the finished entry.
A running API holds its entry's lock shared for its whole life, which is how
eviction (LRU by last use, down to `KILN_CACHE_MAX_BYTES`, default 20 GiB) and
`kiln cache prune` know to leave it alone.
"""

from __future__ import annotations

import builtins  # `Cache.list` shadows the builtin inside the class body
import contextlib
import fcntl
import hashlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson

DEFAULT_MAX_BYTES = 20 * 2**30


def cache_dir() -> Path:
    """Where the cache lives: KILN_CACHE_DIR, else $KILN_HOME/cache, else ~/.kiln/cache."""
    if os.environ.get("KILN_CACHE_DIR"):
        return Path(os.environ["KILN_CACHE_DIR"]).expanduser()
    home = os.environ.get("KILN_HOME") or Path.home() / ".kiln"
    return Path(home).expanduser() / "cache"


def max_bytes_from_env() -> int:
    """KILN_CACHE_MAX_BYTES (bytes, or a size such as 5Gi or 500M); default 20 GiB."""
    value = os.environ.get("KILN_CACHE_MAX_BYTES")
    if not value:
        return DEFAULT_MAX_BYTES
    from kiln.quantities import parse_bytes

    try:
        return parse_bytes(value.strip(), what="cache")
    except ValueError as exc:
        sys.stderr.write(f"KILN_CACHE_MAX_BYTES ignored ({exc}); using 20 GiB\n")
        return DEFAULT_MAX_BYTES


@dataclass(frozen=True)
class CacheEntry:
    """One cached model, as `kiln cache ls` shows it."""

    key: str
    uri: str
    identity: str
    size: int
    last_used: float
    path: Path
    in_use: bool = False


Build = Callable[[Path, Path], str]
"""build(tree, scratch) fills `tree` with the model and returns its path relative to `tree`."""


class Cache:
    """A cache folder. Safe to use from many processes at once (every step is locked or atomic)."""

    def __init__(self, root: Path | None = None, max_bytes: int | None = None) -> None:
        self.root = Path(root) if root is not None else cache_dir()
        self.max_bytes = max_bytes if max_bytes is not None else max_bytes_from_env()
        self.blobs = self.root / "blobs"
        self.models = self.root / "models"
        self.entries = self.root / "entries"
        self.tmp = self.root / "tmp"
        self._held: dict[str, int] = {}  # key -> fd holding a shared lock while in use

    @staticmethod
    def key_for(source: str, identity: str) -> str:
        return hashlib.sha256(f"{source}\n{identity}".encode()).hexdigest()[:32]

    # -- using an entry --------------------------------------------------------------------

    def get(self, source: str, identity: str, build: Build) -> Path:
        """The local path of `source` at `identity`, built once by `build` if not cached yet.

        Returns with the entry marked in use by this process (until `release`),
        so no other process evicts it while the model is loaded from it.
        """
        for folder in (self.blobs, self.models, self.entries, self.tmp):
            folder.mkdir(parents=True, exist_ok=True)
        key = self.key_for(source, identity)
        if key in self._held:
            return self._finish(key)
        fd = os.open(self.entries / f"{key}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            with self._global(fcntl.LOCK_SH):
                fcntl.flock(fd, fcntl.LOCK_SH)
                ready = self._complete(key)
            if not ready:
                fcntl.flock(fd, fcntl.LOCK_EX)  # wait for a download in progress elsewhere
                if not self._complete(key):
                    self._build(key, source, identity, build)
                with self._global(fcntl.LOCK_SH):
                    fcntl.flock(fd, fcntl.LOCK_SH)
        except BaseException:
            os.close(fd)
            raise
        self._held[key] = fd
        path = self._finish(key)
        self.evict(self.max_bytes)
        return path

    def release(self, path: Path | None = None) -> None:
        """Stop marking entries in use: the one holding `path`, or all of this object's."""
        for key in list(self._held):
            if path is None or Path(path).is_relative_to(self.models / key):
                os.close(self._held.pop(key))

    def find(self, source: str) -> tuple[str, str] | None:
        """(key, identity) of the most recently used complete entry for `source`, if any."""
        best: tuple[float, str, str] | None = None
        for meta_path in self.entries.glob("*.json") if self.entries.is_dir() else []:
            meta = _read_json(meta_path)
            if meta and meta.get("uri") == source and self._complete(meta_path.stem):
                used = meta_path.stat().st_mtime
                if best is None or used > best[0]:
                    best = (used, meta_path.stem, str(meta.get("identity", "")))
        return (best[1], best[2]) if best else None

    def _finish(self, key: str) -> Path:
        meta_path = self.entries / f"{key}.json"
        os.utime(meta_path)  # last use, for LRU
        rel = str((_read_json(meta_path) or {}).get("path", ""))
        return self.models / key / rel if rel else self.models / key

    def _complete(self, key: str) -> bool:
        return (self.entries / f"{key}.json").is_file() and (self.models / key).is_dir()

    def _build(self, key: str, source: str, identity: str, build: Build) -> None:
        scratch = Path(tempfile.mkdtemp(prefix=f"{key}-", dir=self.tmp))
        try:
            tree = scratch / "tree"
            tree.mkdir()
            rel = build(tree, scratch)
            size = _tree_size(tree)
            final = self.models / key
            if final.exists():  # left by a process that died between its two renames
                shutil.rmtree(final)
            tree.rename(final)
            meta = {
                "uri": source,
                "identity": identity,
                "path": rel,
                "size": size,
                "created": time.time(),
            }
            _write_json(self.entries / f"{key}.json", meta)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    def store_blob(self, file: Path, sha256: str) -> None:
        """Record `file` (already linked into a model tree) under its content hash.

        When the same bytes are already stored, `file` becomes another link to
        them, so two model paths holding one file take its size once on disk.
        """
        blob = self.blobs / sha256
        try:
            os.link(file, blob)
            return
        except FileExistsError:
            pass
        except OSError:
            return  # no hard links on this disk: the tree keeps its own copy
        with contextlib.suppress(OSError):
            spare = file.with_name(file.name + ".link")
            os.link(blob, spare)
            os.replace(spare, file)

    # -- listing and eviction -------------------------------------------------------------

    def list(self) -> list[CacheEntry]:
        """Every complete entry, least recently used first."""
        out: list[CacheEntry] = []
        for meta_path in self.entries.glob("*.json") if self.entries.is_dir() else []:
            key = meta_path.stem
            meta = _read_json(meta_path)
            if not meta or not self._complete(key):
                continue
            rel = str(meta.get("path", ""))
            out.append(
                CacheEntry(
                    key=key,
                    uri=str(meta.get("uri", "")),
                    identity=str(meta.get("identity", "")),
                    size=int(meta.get("size", 0)),
                    last_used=meta_path.stat().st_mtime,
                    path=self.models / key / rel if rel else self.models / key,
                    in_use=self._in_use(key),
                )
            )
        return sorted(out, key=lambda e: e.last_used)

    def evict(
        self,
        max_bytes: int | None = None,
        *,
        older_than: float | None = None,
        everything: bool = False,
    ) -> tuple[builtins.list[CacheEntry], builtins.list[CacheEntry]]:
        """Remove least recently used entries until the rule holds; (removed, kept in use).

        Rules: down to `max_bytes` in total, every entry unused for `older_than`
        seconds, or `everything`. Entries in use by a running API are skipped.
        """
        if not self.entries.is_dir():
            return [], []
        removed: list[CacheEntry] = []
        busy: list[CacheEntry] = []
        with self._global(fcntl.LOCK_EX):
            entries = self.list()
            total = sum(e.size for e in entries)
            now = time.time()
            for entry in entries:
                wanted = (
                    everything
                    or (older_than is not None and now - entry.last_used > older_than)
                    or (max_bytes is not None and total > max_bytes)
                )
                if not wanted:
                    continue
                if self._remove(entry.key):
                    removed.append(entry)
                    total -= entry.size
                else:
                    busy.append(entry)
            self._collect_garbage()
        return removed, busy

    def _remove(self, key: str) -> bool:
        if key in self._held:
            return False
        fd = os.open(self.entries / f"{key}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        try:
            (self.entries / f"{key}.json").unlink(missing_ok=True)
            doomed = self.tmp / f"evicted-{key}-{os.getpid()}"
            with contextlib.suppress(FileNotFoundError):
                (self.models / key).rename(doomed)
                shutil.rmtree(doomed, ignore_errors=True)
        finally:
            os.close(fd)
        return True

    def _collect_garbage(self) -> None:
        """Drop blobs no model links to any more, and scratch left by crashed downloads."""
        for blob in self.blobs.iterdir():
            with contextlib.suppress(OSError):
                if blob.stat().st_nlink <= 1:
                    blob.unlink()
        day_ago = time.time() - 86400
        for leftover in self.tmp.iterdir():
            with contextlib.suppress(OSError):
                if leftover.stat().st_mtime < day_ago:
                    shutil.rmtree(leftover, ignore_errors=True)

    def _in_use(self, key: str) -> bool:
        if key in self._held:
            return True
        try:
            fd = os.open(self.entries / f"{key}.lock", os.O_RDONLY)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def _global(self, mode: int) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / "cache.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, mode)
            yield
        finally:
            os.close(fd)


def _tree_size(tree: Path) -> int:
    return sum(p.stat().st_size for p in tree.rglob("*") if p.is_file() and not p.is_symlink())


def _read_json(path: Path) -> dict | None:
    try:
        data = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_bytes(orjson.dumps(data))
    os.replace(tmp, path)
