"""From a `model:` value to a local path a runtime can open.

- A local path (or `file://`) is used in place; a local archive is unpacked
  into the cache once per version of the file.
- `s3://`, `gs://`, `http(s)://`: one metadata request (HEAD, or a listing for
  a folder) learns the object's current identity; when the cache holds that
  identity, nothing is downloaded. A restart therefore costs one metadata
  request and no bytes, and a model replaced at the same path is picked up.
  If the store cannot be reached but an earlier copy is cached, that copy is
  used (with a note on stderr), so an API restarts through a network outage.
- `hf://org/repo@rev`: the Hugging Face Hub's own cache (see `hf.py`).

Every `.onnx` file that ends up local is checked for external data paths
that leave its folder.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from kiln.storage import archives, hf, remote
from kiln.storage.cache import Cache
from kiln.storage.errors import ModelNotFound, StorageUnreachable
from kiln.storage.onnx_data import check_external_data
from kiln.storage.uri import ModelUri, parse_uri

_default: Cache | None = None


def default_cache() -> Cache:
    """The process's cache, configured from the environment on first use."""
    global _default
    if _default is None:
        _default = Cache()
    return _default


def materialize(model: str, *, cache: Cache | None = None, base: str | Path | None = None) -> Path:
    """The local path of `model` (a local path or any supported URI), fetching it if needed.

    Raises a StorageError subclass whose message names the path and what to
    do. The cache entry used stays marked in use until the process exits (or
    `cache.release()`), so a running API's files are never evicted.
    """
    uri = parse_uri(model, base)
    if uri.scheme == "hf":
        path = hf.snapshot(uri)
        _check_onnx(path)
        return path
    if uri.scheme == "file":
        return _local(uri, cache)
    return _remote(uri, cache or default_cache())


def _local(uri: ModelUri, cache: Cache | None) -> Path:
    path = Path(uri.path)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ModelNotFound(
            f"the model path {path} does not exist",
            fix="check `model` in kiln.yaml; relative paths are read from the config's folder",
        ) from None
    if not (uri.is_archive and path.is_file()):
        _check_onnx(path)
        return path
    identity = f"local|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"

    def build(tree: Path, scratch: Path) -> str:
        archives.unpack(path, tree)
        _check_onnx(tree)
        return str(archives.archive_root(tree).relative_to(tree))

    return (cache or default_cache()).get(f"file://{uri.path}", _clean(identity), build)


def _source(uri: ModelUri) -> str:
    return f"{uri.scheme}://{uri.path}" if uri.scheme in ("s3", "gs") else uri.raw


def _remote(uri: ModelUri, cache: Cache) -> Path:
    source = _source(uri)
    try:
        with remote.storage_errors(uri):
            fs = remote.filesystem(uri)
            kind, files = remote.stat(fs, uri)
    except StorageUnreachable as exc:
        found = cache.find(source)
        if found is None:
            raise
        sys.stderr.write(f"note: {exc.problem}; using the copy cached earlier\n")
        return cache.get(source, found[1], _never_built)
    identity = _clean("\n".join(f"{f.rel}|{f.identity}" for f in files))

    def build(tree: Path, scratch: Path) -> str:
        with remote.storage_errors(uri):
            if kind == "file" and uri.is_archive:
                download = scratch / uri.name  # its suffix says which kind of archive
                remote.fetch(fs, uri, files[0], download)
                archives.unpack(download, tree)
                _check_onnx(tree)
                return str(archives.archive_root(tree).relative_to(tree))
            for item in files:
                _fetch_into(fs, uri, item, tree, cache)
        _check_onnx(tree)  # before the entry is published: a refused model is never cached
        return files[0].rel if kind == "file" else ""

    return cache.get(source, identity, build)


def _fetch_into(fs: Any, uri: ModelUri, item: remote.RemoteFile, tree: Path, cache: Cache) -> None:
    rel = archives.safe_member(item.rel)  # a listed key must not climb out of the model folder
    if not rel.parts:
        return
    target = tree.joinpath(*rel.parts)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    sha256 = remote.fetch(fs, uri, item, partial)
    os.replace(partial, target)
    cache.store_blob(target, sha256)


def _never_built(tree: Path, scratch: Path) -> str:
    raise StorageUnreachable("the cached copy disappeared while the store is unreachable")


def _clean(identity: str) -> str:
    return identity.replace("\x00", "")


def _check_onnx(path: Path) -> None:
    if path.is_file() and path.suffix.lower() == ".onnx":
        check_external_data(path)
    elif path.is_dir():
        for file in path.rglob("*.onnx"):
            check_external_data(file)
