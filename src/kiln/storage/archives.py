"""Unpacking .zip and .tar(.gz) archives so that nothing lands outside the target folder.

Archives from a bucket or a user are untrusted: a member named `../../x`,
`/etc/x`, a symlink to `/` followed by a member written "through" it, or a
hard link to a file outside are the classic zip-slip tricks. Every member is
checked before anything is written, links are refused in zips and kept inside
the folder in tars, the stdlib's `data` filter is applied as a second line,
and the unpacked size is capped (zip bombs). Used by the model cache and by
the management API's model store.
"""

from __future__ import annotations

import os
import posixpath
import re
import stat
import tarfile
import zipfile
from pathlib import Path, PurePosixPath
from typing import IO

from kiln.storage.errors import UnsafeArchive

MAX_UNPACKED_BYTES = 16 * 2**30  # refuse archives that would unpack past this (zip bombs)
MAX_MEMBERS = 100_000
_REFUSED = "refusing it"


def unpack(archive: Path, dest: Path) -> None:
    """Unpack a .zip or .tar(.gz) into the existing folder `dest`; UnsafeArchive if unsafe."""
    if archive.name.lower().endswith(".zip"):
        unpack_zip(archive, dest)
    else:
        unpack_tar(archive, dest)
    check_links(dest, Path(os.path.realpath(dest)), "the archive")


def safe_member(name: str) -> PurePosixPath:
    """An archive member's relative path; UnsafeArchive for absolute names and `..`."""
    if "\x00" in name or "\\" in name:
        raise UnsafeArchive(f"archive member '{name}' has characters not allowed in a path")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise UnsafeArchive(f"archive member '{name}' has an absolute path; {_REFUSED}")
    path = PurePosixPath(name)
    if ".." in path.parts:
        raise UnsafeArchive(
            f"archive member '{name}' climbs out of the archive with '..' (zip-slip); {_REFUSED}"
        )
    return path


def check_links(root: Path, allowed: Path, where: str) -> None:
    """Refuse a tree holding a symlink that resolves outside `allowed`."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for entry in (*dirnames, *filenames):
            full = os.path.join(dirpath, entry)
            if os.path.islink(full) and not Path(os.path.realpath(full)).is_relative_to(allowed):
                rel = os.path.relpath(full, root)
                raise UnsafeArchive(
                    f"'{rel}' is a symlink that leads out of {where}; replace it with the file"
                )


def unpack_zip(archive: Path, dest: Path) -> None:
    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile:
        raise UnsafeArchive(f"'{archive.name}' is not a valid zip archive") from None
    with zf:
        members = zf.infolist()
        if len(members) > MAX_MEMBERS:
            raise UnsafeArchive(f"'{archive.name}' has over {MAX_MEMBERS} members")
        total = 0
        for info in members:
            safe_member(info.filename)
            if stat.S_ISLNK(info.external_attr >> 16):
                raise UnsafeArchive(
                    f"archive member '{info.filename}' is a symlink; archives may hold only "
                    "files and folders"
                )
            total += info.file_size
            if total > MAX_UNPACKED_BYTES:
                raise UnsafeArchive(f"'{archive.name}' unpacks to more than the size limit")
        for info in members:
            rel = safe_member(info.filename)
            if not rel.parts:
                continue
            target = dest.joinpath(*rel.parts)
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as out:
                _copy_capped(src, out, info.file_size, info.filename)


def _copy_capped(src: IO[bytes], out: IO[bytes], declared: int, name: str) -> None:
    written = 0
    while block := src.read(1 << 20):
        written += len(block)
        if written > declared:
            raise UnsafeArchive(f"archive member '{name}' is larger than it declares")
        out.write(block)


def unpack_tar(archive: Path, dest: Path) -> None:
    try:
        tf = tarfile.open(archive, "r:*")
    except (tarfile.TarError, OSError):
        raise UnsafeArchive(f"'{archive.name}' is not a valid tar archive") from None
    with tf:
        members = tf.getmembers()
        if len(members) > MAX_MEMBERS:
            raise UnsafeArchive(f"'{archive.name}' has over {MAX_MEMBERS} members")
        total = 0
        for member in members:
            rel = safe_member(member.name)
            kinds = (member.isfile(), member.isdir(), member.issym(), member.islnk())
            if member.isdev() or not any(kinds):
                raise UnsafeArchive(
                    f"archive member '{member.name}' is a device or special file; {_REFUSED}"
                )
            if member.issym():
                target = posixpath.normpath(posixpath.join(str(rel.parent), member.linkname))
                if member.linkname.startswith("/") or target == ".." or target.startswith("../"):
                    raise UnsafeArchive(
                        f"archive member '{member.name}' links to '{member.linkname}', "
                        f"outside the archive; {_REFUSED}"
                    )
            if member.islnk():
                safe_member(member.linkname)
            total += max(0, member.size)
            if total > MAX_UNPACKED_BYTES:
                raise UnsafeArchive(f"'{archive.name}' unpacks to more than the size limit")
        try:
            if hasattr(tarfile, "data_filter"):
                tf.extractall(dest, filter="data")  # the stdlib's own checks, a second line
            else:  # pragma: no cover - Python < 3.11.4
                tf.extractall(dest)  # noqa: S202 - every member was checked above
        except tarfile.TarError as exc:
            raise UnsafeArchive(
                f"'{archive.name}' cannot be unpacked safely ({type(exc).__name__})"
            ) from None


def archive_root(folder: Path) -> Path:
    """`folder`, or its only subfolder when the archive held one folder (a zipped model dir).

    `zip -r model.zip saved_model/` gives one top-level folder; the model is
    that folder, not its parent. macOS's `__MACOSX` side folder is ignored.
    """
    entries = [p for p in folder.iterdir() if p.name != "__MACOSX"]
    if len(entries) == 1 and entries[0].is_dir() and not entries[0].is_symlink():
        return entries[0]
    return folder
