"""Where `POST /models?url=...` may load a model from: the model store, and nothing else.

TorchServe's register API fetched any URL and unpacked any archive, which is
how ShellTorch (CVE-2023-43654) turned it into SSRF and arbitrary file writes.
Kiln takes only a name or path inside the server's model store (a project
folder with kiln.yaml, or a .zip / .tar.gz of one) and refuses, with 400:

- remote URLs (`http(s)://`, any other scheme), cloud metadata and link-local hosts;
- `..` anywhere in the path, absolute paths outside the store, and symlinks
  (the path itself or inside a project folder) that lead out of it;
- archive members with absolute names or `..`, links that point out of the
  extraction folder, device files, and archives that unpack past a size limit.

Archives are unpacked into a content-addressed folder (`<cache>/<name>-<sha256>`),
so registering the same archive twice reuses one copy.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
import shutil
import tempfile
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlsplit

from kiln.config import CONFIG_NAMES
from kiln.errors import InvalidInput, NotFound
from kiln.storage.archives import check_links, unpack_tar, unpack_zip
from kiln.storage.errors import UnsafeArchive

_ARCHIVES = (".zip", ".tar.gz", ".tgz", ".tar")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):")
_METADATA_HOSTS = {"metadata", "metadata.google.internal", "instance-data"}
_REMOTE = (
    "remote model URLs are not allowed; copy the archive into the model store "
    "(<KILN_HOME>/model-store unless the server sets another) and register it by name"
)


class UnsafeModelSource(UnsafeArchive):
    """The registration URL or archive would reach outside the model store."""


def resolve_in_store(store: Path, url: str) -> Path:
    """The real path `url` names inside `store`; UnsafeModelSource or NotFound otherwise."""
    url = url.strip()
    if not url:
        raise InvalidInput("the url parameter is empty; name a project folder or archive")
    if "\x00" in url or "\\" in url:
        raise UnsafeModelSource(f"'{url}' contains characters not allowed in a model path")
    scheme = _SCHEME.match(url)
    if scheme and len(scheme.group(1)) > 1:  # one letter would be a Windows drive
        url = _path_from_url(url, scheme.group(1).lower())
    if ".." in PurePosixPath(url).parts:
        raise UnsafeModelSource(
            f"'{url}' contains '..'; name a file or folder inside the model store"
        )
    store_abs = Path(os.path.abspath(store))
    store_real = Path(os.path.realpath(store))
    candidate = Path(url) if os.path.isabs(url) else store_abs / url
    lexical = Path(os.path.abspath(candidate))
    inside = lexical.is_relative_to(store_abs) or lexical.is_relative_to(store_real)
    if not inside:
        raise UnsafeModelSource(
            f"'{url}' is outside the model store; copy it into the store and register it by name"
        )
    real = Path(os.path.realpath(lexical))
    if not real.is_relative_to(store_real):
        raise UnsafeModelSource(
            f"'{url}' is a symlink that leads out of the model store; copy the files into "
            "the store instead of linking to them"
        )
    if not real.exists():
        raise NotFound(
            f"no '{url}' in the model store; copy the project folder or archive there first"
        )
    return real


def _path_from_url(url: str, scheme: str) -> str:
    parts = urlsplit(url)
    if scheme in ("http", "https"):
        host = (parts.hostname or "").lower()
        if _is_metadata_host(host):
            raise UnsafeModelSource(f"'{host}' is a link-local / cloud metadata address; {_REMOTE}")
        raise UnsafeModelSource(_REMOTE)
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise UnsafeModelSource(_REMOTE)
        return unquote(parts.path)
    raise UnsafeModelSource(f"'{scheme}:' model URLs are not allowed; {_REMOTE}")


def _is_metadata_host(host: str) -> bool:
    if host in _METADATA_HOSTS:
        return True
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return address.is_link_local or address == ipaddress.ip_address("fd00:ec2::254")


def prepare_project(store: Path, url: str, cache: Path) -> Path:
    """The project folder to load for `url`: a folder in the store, or an archive unpacked."""
    path = resolve_in_store(store, url)
    store_real = Path(os.path.realpath(store))
    if path.is_dir():
        check_links(path, store_real, "the model store")
        return project_root(path, url)
    name = path.name.lower()
    if not name.endswith(_ARCHIVES):
        raise InvalidInput(
            f"'{url}' is neither a project folder with kiln.yaml nor a "
            ".zip / .tar.gz archive of one"
        )
    digest = _sha256(path)
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", name.split(".")[0])[:60] or "model"
    target = cache / f"{stem}-{digest[:16]}"
    if not target.is_dir():
        cache.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=".unpack-", dir=cache))
        try:
            if name.endswith(".zip"):
                unpack_zip(path, scratch)
            else:
                unpack_tar(path, scratch)
            check_links(scratch, Path(os.path.realpath(scratch)), "the archive")
            try:
                scratch.rename(target)
            except OSError:  # unpacked meanwhile by a concurrent registration
                if not target.is_dir():
                    raise
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return project_root(target, url)


def project_root(folder: Path, url: str) -> Path:
    """`folder` if it holds kiln.yaml, else its only subfolder that does (archives of a folder)."""
    if _has_config(folder):
        return folder
    subdirs = [p for p in folder.iterdir() if p.is_dir() and p.name != "__MACOSX"]
    if len(subdirs) == 1 and _has_config(subdirs[0]):
        return subdirs[0]
    raise InvalidInput(
        f"'{url}' has no kiln.yaml (or cortex.yaml) at its top; register a Kiln project folder"
    )


def _has_config(folder: Path) -> bool:
    return any((folder / name).is_file() for name in CONFIG_NAMES)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
