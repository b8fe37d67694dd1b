"""Reproducible OCI layers and images: tar and gzip written so the same inputs give the
same bytes, and the image layout / archive around them.

Why by hand: a layer's digest is the sha256 of its compressed bytes, so anything that
varies between builds (file times, the order a filesystem lists a folder in, owner
names, gzip's header time and file name) changes the digest and makes a registry push
and a pull of unchanged content again. Every entry here has mtime 0, uid/gid 0 (or the
runtime user's ids where given), no owner names, and entries sorted by path.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
REF_ANNOTATION = "org.opencontainers.image.ref.name"
COMPRESS_LEVEL = 6


@dataclass(frozen=True)
class Entry:
    """One member of a layer: `path` inside the image (no leading slash)."""

    path: str
    kind: str  # "file", "dir" or "symlink"
    source: Path | None = None  # a file's bytes come from here ...
    data: bytes | None = None  # ... or from here
    target: str = ""  # a symlink's target
    mode: int = 0o644
    uid: int = 0
    gid: int = 0


@dataclass(frozen=True)
class Layer:
    """A written layer blob: `digest` of the gzip bytes, `diff_id` of the tar."""

    digest: str
    diff_id: str
    size: int
    media_type: str = MEDIA_LAYER_GZIP
    comment: str = ""

    def descriptor(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


class _Hashing(io.RawIOBase):
    """A write-only stream that hashes and counts what passes to `target`."""

    def __init__(self, target: IO[bytes] | None) -> None:
        self.target = target
        self.sha = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self.sha.update(view)
        self.size += len(view)
        if self.target is not None:
            self.target.write(view)
        return len(view)


def tree_entries(
    root: Path, prefix: str, uid: int = 0, gid: int = 0, files: Iterable[str] | None = None
) -> list[Entry]:
    """Entries for the folder `root` placed at `prefix` (its parents included), modes
    normalised to 0755 (folders and executables) or 0644; `files` limits it to those
    relative paths (their parent folders come along)."""
    entries: dict[str, Entry] = {}
    prefix = prefix.strip("/")

    def add_dirs(rel_dir: str) -> None:
        parts = [p for p in f"{prefix}/{rel_dir}".strip("/").split("/") if p]
        for i in range(1, len(parts) + 1):
            path = "/".join(parts[:i])
            entries.setdefault(path, Entry(path, "dir", mode=0o755, uid=uid, gid=gid))

    add_dirs("")
    if files is None:
        rels: list[str] = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            rel_dir = Path(dirpath).relative_to(root).as_posix()
            rel_dir = "" if rel_dir == "." else rel_dir
            add_dirs(rel_dir)
            for name in dirnames:  # symlinked folders are links, not trees
                if (Path(dirpath) / name).is_symlink():
                    rels.append(f"{rel_dir}/{name}".strip("/"))
            rels.extend(f"{rel_dir}/{name}".strip("/") for name in filenames)
    else:
        rels = list(files)
    for rel in rels:
        path = root / rel
        parent = Path(rel).parent.as_posix()
        add_dirs("" if parent == "." else parent)
        name = f"{prefix}/{rel}".strip("/")
        if path.is_symlink():
            entries[name] = Entry(name, "symlink", target=os.readlink(path), mode=0o777)
        elif path.is_file():
            executable = path.stat().st_mode & stat.S_IXUSR
            mode = 0o755 if executable else 0o644
            entries[name] = Entry(name, "file", source=path, mode=mode, uid=uid, gid=gid)
    return [entries[k] for k in sorted(entries)]


def _tar_info(entry: Entry) -> tarfile.TarInfo:
    info = tarfile.TarInfo(entry.path + ("/" if entry.kind == "dir" else ""))
    info.mtime = 0
    info.mode = entry.mode
    info.uid, info.gid = entry.uid, entry.gid
    info.uname = info.gname = ""
    if entry.kind == "dir":
        info.type = tarfile.DIRTYPE
    elif entry.kind == "symlink":
        info.type = tarfile.SYMTYPE
        info.linkname = entry.target
    else:
        info.size = len(entry.data) if entry.data is not None else entry.source.stat().st_size  # type: ignore[union-attr]
    return info


def write_layer(entries: Iterable[Entry], blobs: Path, comment: str = "") -> Layer:
    """Write `entries` (sorted here) as a gzip'd tar into the blob folder; its digest."""
    return _write_blob(blobs, comment, lambda tar: _add_entries(tar, entries))


def _add_entries(tar: tarfile.TarFile, entries: Iterable[Entry]) -> None:
    for entry in sorted(entries, key=lambda e: e.path):
        info = _tar_info(entry)
        if entry.kind != "file":
            tar.addfile(info)
        elif entry.data is not None:
            tar.addfile(info, io.BytesIO(entry.data))
        else:
            with entry.source.open("rb") as f:  # type: ignore[union-attr]
                tar.addfile(info, f)


def layer_from_tar(tar_path: Path, blobs: Path, comment: str = "") -> Layer:
    """A layer of an existing (uncompressed) tar, byte for byte, gzip'd reproducibly."""

    def copy(raw: IO[bytes]) -> None:
        with tar_path.open("rb") as f:
            shutil.copyfileobj(f, raw, 1 << 20)

    return _write_blob(blobs, comment, None, copy)


def _write_blob(blobs: Path, comment: str, fill: Any = None, raw_fill: Any = None) -> Layer:
    blobs.mkdir(parents=True, exist_ok=True)
    tmp = blobs / f".tmp-{os.getpid()}-{id(fill)}"
    with tmp.open("wb") as out:
        compressed = _Hashing(out)
        with gzip.GzipFile(
            filename="", mode="wb", compresslevel=COMPRESS_LEVEL, fileobj=compressed, mtime=0
        ) as gz:
            plain = _Hashing(gz)  # type: ignore[arg-type]
            if raw_fill is not None:
                raw_fill(plain)
            else:
                with tarfile.open(
                    fileobj=plain,
                    mode="w|",
                    format=tarfile.PAX_FORMAT,  # type: ignore[arg-type]
                ) as tar:
                    fill(tar)
    digest = compressed.sha.hexdigest()
    os.replace(tmp, blobs / digest)
    return Layer(
        f"sha256:{digest}", f"sha256:{plain.sha.hexdigest()}", compressed.size, comment=comment
    )


def put_json(blobs: Path, document: dict[str, Any]) -> tuple[str, int]:
    """Store a JSON document (canonical: sorted keys, no spaces) as a blob."""
    data = json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
    digest = hashlib.sha256(data).hexdigest()
    blobs.mkdir(parents=True, exist_ok=True)
    (blobs / digest).write_bytes(data)
    return f"sha256:{digest}", len(data)


@dataclass
class Image:
    """An image to write: its layers (blobs in `blobs`) and its config document."""

    blobs: Path
    layers: list[Layer]
    config: dict[str, Any]
    ref: str = ""
    annotations: dict[str, str] = field(default_factory=dict)

    def manifest(self) -> tuple[dict[str, Any], str, int]:
        """(manifest, its digest, its size), writing the config and manifest blobs."""
        config = dict(self.config)
        config["rootfs"] = {"type": "layers", "diff_ids": [layer.diff_id for layer in self.layers]}
        config_digest, config_size = put_json(self.blobs, config)
        manifest: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": MEDIA_MANIFEST,
            "config": {"mediaType": MEDIA_CONFIG, "digest": config_digest, "size": config_size},
            "layers": [layer.descriptor() for layer in self.layers],
        }
        if self.annotations:
            manifest["annotations"] = dict(self.annotations)
        digest, size = put_json(self.blobs, manifest)
        return manifest, digest, size

    def _files(self) -> Iterator[tuple[str, Path | bytes]]:
        """The layout's files in a fixed order: oci-layout, index.json, the blobs."""
        manifest, digest, size = self.manifest()
        descriptor: dict[str, Any] = {"mediaType": MEDIA_MANIFEST, "digest": digest, "size": size}
        if self.ref:
            descriptor["annotations"] = {REF_ANNOTATION: self.ref}
        index = {"schemaVersion": 2, "mediaType": MEDIA_INDEX, "manifests": [descriptor]}
        yield "oci-layout", b'{"imageLayoutVersion":"1.0.0"}'
        yield "index.json", json.dumps(index, sort_keys=True, separators=(",", ":")).encode()
        digests = [digest, manifest["config"]["digest"], *[x.digest for x in self.layers]]
        for blob in sorted(set(digests)):
            yield f"blobs/sha256/{blob.split(':', 1)[1]}", self.blobs / blob.split(":", 1)[1]

    def write(self, output: Path) -> str:
        """Write an OCI archive (`output` ends in .tar) or layout folder; the manifest digest."""
        digest = self.manifest()[1]
        output.parent.mkdir(parents=True, exist_ok=True)
        if output.suffix == ".tar":
            tmp = output.with_name(output.name + ".partial")
            with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
                for folder in ("blobs/", "blobs/sha256/"):
                    info = tarfile.TarInfo(folder)
                    info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 0
                    tar.addfile(info)
                for name, content in self._files():
                    data = content if isinstance(content, bytes) else None
                    info = tarfile.TarInfo(name)
                    info.mode, info.mtime = 0o644, 0
                    info.size = len(data) if data is not None else content.stat().st_size  # type: ignore[union-attr]
                    if data is not None:
                        tar.addfile(info, io.BytesIO(data))
                    else:
                        with content.open("rb") as f:  # type: ignore[union-attr]
                            tar.addfile(info, f)
            os.replace(tmp, output)
        else:
            if output.exists():
                shutil.rmtree(output)
            for name, content in self._files():
                target = output / name
                target.parent.mkdir(parents=True, exist_ok=True)
                if isinstance(content, bytes):
                    target.write_bytes(content)
                else:
                    try:
                        os.link(content, target)
                    except OSError:
                        shutil.copyfile(content, target)
        return digest
