"""Packing a project for `kiln deploy`, and unpacking it safely on the server.

A deploy uploads one gzip'd tar of the project folder. Which files go in is
decided by `.kilnignore` (gitignore syntax, via pathspec) plus a fixed list of
things that never belong in a deploy (VCS folders, virtualenvs, caches). The
revision's name is a hash of the *content* (relative paths, executable bits and
file bytes), not of the archive bytes, so the same project always hashes the
same whatever the file times or the order the filesystem lists them in; that is
what makes "redeploying an unchanged project is a no-op" exact.

The server recomputes the hash from what it extracted: it never trusts a hash
sent by a client. Extraction uses tarfile's "data" filter, which refuses
absolute paths, `..`, device files and links that leave the target folder.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import hashlib
import io
import lzma
import os
import shutil
import stat
import tarfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pathspec

from kiln.errors import InvalidInput, PayloadTooLarge

IGNORE_FILE = ".kilnignore"
ALWAYS_IGNORED = [
    ".git/",
    ".hg/",
    ".svn/",
    "__pycache__/",
    "*.pyc",
    ".venv/",
    "venv/",
    ".mypy_cache/",
    ".pytest_cache/",
    ".ruff_cache/",
    ".ipynb_checkpoints/",
    ".DS_Store",
    "server.json",
]
MAX_ARCHIVE_BYTES = int(os.environ.get("KILN_MAX_DEPLOY_BYTES", 1 << 30))  # 1 GiB
MAX_FILES = 100_000


@dataclass(frozen=True)
class PackedProject:
    archive: bytes
    content_hash: str
    files: list[str]

    @property
    def revision(self) -> str:
        return short_revision(self.content_hash)


def short_revision(content_hash: str) -> str:
    """The name users see: the first 12 hex digits of the content hash."""
    return content_hash[:12]


def _ignore_spec(root: Path) -> pathspec.PathSpec:
    lines = list(ALWAYS_IGNORED)
    ignore_file = root / IGNORE_FILE
    if ignore_file.is_file():
        lines += ignore_file.read_text(encoding="utf-8").splitlines()
    return pathspec.GitIgnoreSpec.from_lines(lines)


def project_files(root: Path) -> list[str]:
    """Relative POSIX paths of the files a deploy includes, sorted."""
    spec = _ignore_spec(root)
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        # Prune ignored folders early (a .venv can hold 100k files).
        dirnames[:] = sorted(
            d for d in dirnames if not spec.match_file(f"{(rel_dir / d).as_posix()}/")
        )
        for name in filenames:
            rel = (rel_dir / name).as_posix()
            path = Path(dirpath) / name
            if spec.match_file(rel) or not path.is_file():
                continue
            found.append(rel)
            if len(found) > MAX_FILES:
                raise InvalidInput(
                    f"the project at {root} has more than {MAX_FILES} files; list what should "
                    f"not be deployed (data, virtualenvs, build output) in {IGNORE_FILE}"
                )
    return sorted(found)


def content_hash(root: Path, files: list[str] | None = None) -> str:
    """SHA-256 over (path, executable bit, sha256 of bytes) of every deployed file."""
    digest = hashlib.sha256(b"kiln-project-v1\0")
    for rel in files if files is not None else project_files(root):
        path = root / rel
        executable = bool(path.stat().st_mode & stat.S_IXUSR)
        digest.update(rel.encode() + b"\0" + (b"x" if executable else b"-") + b"\0")
        digest.update(_file_sha256(path).encode() + b"\n")
    return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def pack_project(root: Path) -> PackedProject:
    """The deploy archive of `root`: a reproducible tar.gz and the content hash."""
    root = root.resolve()
    files = project_files(root)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=6) as tar:
        for rel in files:
            path = root / rel
            info = tarfile.TarInfo(rel)
            info.size = path.stat().st_size
            info.mode = 0o755 if path.stat().st_mode & stat.S_IXUSR else 0o644
            info.mtime = 0
            with path.open("rb") as f:
                tar.addfile(info, f)
    archive = buffer.getvalue()
    if len(archive) > MAX_ARCHIVE_BYTES:
        raise PayloadTooLarge(
            f"the packed project is {len(archive) >> 20} MiB, over the "
            f"{MAX_ARCHIVE_BYTES >> 20} MiB limit; move data and large files out of the "
            f"project or list them in {IGNORE_FILE}, and point model paths at storage"
        )
    return PackedProject(archive, content_hash(root, files), files)


def unpack_project(
    archive: bytes | Path,
    dest: Path,
    *,
    max_unpacked: int | None = None,
    limit_name: str = "the plan's max_unpacked_bytes",
) -> str:
    """Extract a deploy archive (bytes, or the file an upload was streamed to) into `dest`
    (which must not exist); returns its content hash.

    The extraction goes to a sibling temporary folder first and is renamed into
    place, so a crash never leaves a half-written revision behind. With
    `max_unpacked`, it stops (413, nothing kept) as soon as the running total of
    the members' sizes passes it, before writing the member that would pass it: a
    small upload cannot unpack to gigabytes. The decompressed stream is read in
    bounded pieces (no tar header may ask for more than `MAX_HEADER_BYTES` at once),
    so a crafted archive cannot make the server hold a huge header in memory.
    """
    size = len(archive) if isinstance(archive, bytes) else archive.stat().st_size
    if size > MAX_ARCHIVE_BYTES:
        raise PayloadTooLarge(
            f"the upload is {size >> 20} MiB, over the {MAX_ARCHIVE_BYTES >> 20} MiB "
            f"limit (KILN_MAX_DEPLOY_BYTES)"
        )
    tmp = dest.with_name(f".{dest.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # Headers and padding add at most ~1 KiB a member on top of the members' bytes.
    stream_limit = None if max_unpacked is None else max_unpacked + 1024 * (MAX_FILES + 2)
    try:
        with contextlib.ExitStack() as stack:
            raw = (
                io.BytesIO(archive)
                if isinstance(archive, bytes)
                else stack.enter_context(archive.open("rb"))
            )
            source = _BoundedReader(_decompressed(raw, stack), stream_limit)
            tar = stack.enter_context(tarfile.open(fileobj=source, mode="r:"))  # type: ignore[call-overload]
            members = _checked_members(tar, max_unpacked, limit_name)
            tar.extractall(tmp, members=members, filter="data")
        digest = content_hash(tmp, sorted(m.name for m in members if m.isfile()))
        if dest.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.rename(dest)
        return digest
    except (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise InvalidInput(
            f"the uploaded project is not a valid deploy archive ({exc}); deploy with "
            f"`kiln deploy`, which packs the folder for you"
        ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


MAX_HEADER_BYTES = 1 << 20  # a tar header (pax, GNU long name) larger than this is refused


def _decompressed(raw: Any, stack: contextlib.ExitStack) -> Any:
    """`raw` decompressed by what its first bytes say (gzip, bzip2, xz), or as is."""
    head = raw.read(6)
    raw.seek(0)
    if head.startswith(b"\x1f\x8b"):
        return stack.enter_context(gzip.GzipFile(fileobj=raw, mode="rb"))
    if head.startswith(b"BZh"):
        return stack.enter_context(bz2.BZ2File(raw, "rb"))
    if head.startswith(b"\xfd7zXZ\x00"):
        return stack.enter_context(lzma.LZMAFile(raw, "rb"))
    return raw


class _BoundedReader:
    """A seekable view of the decompressed tar stream that refuses to go past `limit`
    bytes and refuses single reads larger than `MAX_HEADER_BYTES` (tarfile reads member
    data in 16 KiB pieces; only headers are read whole)."""

    def __init__(self, inner: Any, limit: int | None) -> None:
        self.inner, self.limit = inner, limit

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0 or size > MAX_HEADER_BYTES:
            raise InvalidInput(
                "the deploy archive has a tar header larger than "
                f"{MAX_HEADER_BYTES >> 20} MiB; it was refused"
            )
        data = self.inner.read(size)
        self._check()
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        if self.limit is not None and whence == 0 and offset > self.limit:
            self._refuse()
        position = self.inner.seek(offset, whence)
        self._check()
        return position

    def tell(self) -> int:
        return self.inner.tell()

    def _check(self) -> None:
        if self.limit is not None and self.inner.tell() > self.limit:
            self._refuse()

    def _refuse(self) -> None:
        raise PayloadTooLarge(
            f"the deploy archive unpacks to more than {self.limit} bytes; it was refused"
        )


def _checked_members(
    tar: tarfile.TarFile,
    max_unpacked: int | None = None,
    limit_name: str = "the plan's max_unpacked_bytes",
) -> list[tarfile.TarInfo]:
    members: list[tarfile.TarInfo] = []
    total = 0
    for member in _iter_members(tar):
        name = member.name
        if name.startswith("/") or ".." in Path(name).parts:
            raise InvalidInput(f"the deploy archive has an unsafe path {name!r}; it was refused")
        if not (member.isfile() or member.isdir()):
            raise InvalidInput(
                f"the deploy archive has {name!r}, which is not a regular file; links and "
                f"devices are not deployed"
            )
        total += member.size if member.isfile() else 0
        if max_unpacked is not None and total > max_unpacked:
            raise PayloadTooLarge(
                f"the project unpacks to more than {_mib(max_unpacked)} ({limit_name}); it "
                f"was refused and nothing was kept. Move data and model files out of the "
                f"project (point model paths at storage) or list them in {IGNORE_FILE}"
            )
        members.append(member)
    return members


def _mib(n: int) -> str:
    return f"{n / 2**20:g} MiB"


def _iter_members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    for count, member in enumerate(tar, 1):
        if count > MAX_FILES:
            raise InvalidInput(f"the deploy archive has more than {MAX_FILES} entries")
        yield member


def read_dotenv(root: Path) -> dict[str, str]:
    """Variables from the project's `.env` (if any): fed to `${VAR}` and to the workers."""
    path = root / ".env"
    if not path.is_file():
        return {}
    from dotenv import dotenv_values

    return {k: v for k, v in dotenv_values(path).items() if v is not None}
