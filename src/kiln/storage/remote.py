"""Talking to object stores through fsspec: which client, what an object is, fetching its bytes.

Credentials and endpoints come only from each provider's standard chain:
boto's (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN,
AWS_PROFILE, instance roles, AWS_ENDPOINT_URL for MinIO and other S3-compatible
stores) and Google's (GOOGLE_APPLICATION_CREDENTIALS, the metadata server,
STORAGE_EMULATOR_HOST). Every client library is imported here, lazily, so
`kiln` starts without them and a missing one is a clear error naming the extra.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.errors import install_hint
from kiln.storage.errors import (
    MissingStorageExtra,
    ModelIntegrityError,
    ModelNotFound,
    StorageAccessDenied,
    StorageError,
    StorageUnreachable,
)
from kiln.storage.uri import ModelUri

_MD5_HEX = re.compile(r"^[0-9a-f]{32}$")
_UNREACHABLE = (
    "EndpointConnectionError",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "ClientConnectorError",
    "ServerDisconnectedError",
    "ServerTimeoutError",
    "TimeoutError",
    "ConnectionError",
    "ConnectionRefusedError",
    "gaierror",
)
_NO_CREDENTIALS = ("NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError")
_EXTRA = {"s3": ("s3fs", "s3"), "gs": ("gcsfs", "gcs"), "http": ("aiohttp", "http")}


@dataclass(frozen=True)
class RemoteFile:
    """One object: where it is, how big, and what identifies this version of its bytes."""

    path: str  # as the filesystem names it
    rel: str  # relative to the model's root (its file name for a single object)
    size: int
    identity: str  # ETag / generation / version id; changes when the bytes change
    md5: str | None = None  # hex, when the store states one we can check against


def filesystem(uri: ModelUri) -> Any:
    """The fsspec filesystem for `uri`'s scheme, configured from the environment only."""
    scheme = "http" if uri.scheme in ("http", "https") else uri.scheme
    module, extra = _EXTRA[scheme]
    try:
        __import__(module)
    except ImportError:
        raise MissingStorageExtra(
            f"reading {uri.scheme}:// model paths needs the '{module}' package, which is not "
            f"installed (model path: {uri})",
            fix=f"install Kiln's {extra} extra: {install_hint(extra)}",
        ) from None
    if scheme == "s3":
        import s3fs  # type: ignore[import-untyped]  # s3fs ships no type hints

        # Bounded retries: an unreachable endpoint fails in seconds, not minutes.
        config = {"connect_timeout": 10, "read_timeout": 60, "retries": {"max_attempts": 3}}
        return s3fs.S3FileSystem(config_kwargs=config, skip_instance_cache=True)
    if scheme == "gs":
        return _gcs_filesystem()
    from fsspec.implementations.http import HTTPFileSystem  # type: ignore[import-untyped]  # untyped

    return HTTPFileSystem(skip_instance_cache=True)


def _gcs_filesystem() -> Any:
    emulator = os.environ.get("STORAGE_EMULATOR_HOST")
    if emulator:
        # Emulators speak only the JSON API: use gcsfs's core class, whose newer
        # subclass first probes the bucket type over gRPC (a 60 s wait on an emulator).
        from gcsfs.core import GCSFileSystem  # type: ignore[import-untyped]  # untyped

        token = None if os.environ.get("GOOGLE_APPLICATION_CREDENTIALS") else "anon"
        return GCSFileSystem(token=token, skip_instance_cache=True)
    import gcsfs  # type: ignore[import-untyped]  # gcsfs ships no type hints

    return gcsfs.GCSFileSystem(skip_instance_cache=True)


def endpoint_of(uri: ModelUri) -> str:
    """Where requests for `uri` go, for error messages."""
    if uri.scheme == "s3":
        url = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        return url or "Amazon S3"
    if uri.scheme == "gs":
        return os.environ.get("STORAGE_EMULATOR_HOST") or "Google Cloud Storage"
    return uri.raw.split("/", 3)[2] if "//" in uri.raw else uri.raw


@contextlib.contextmanager
def storage_errors(uri: ModelUri) -> Iterator[None]:
    """Turn a client library's exception into a StorageError that names the path and a fix."""
    try:
        yield
    except StorageError:
        raise
    except Exception as exc:  # noqa: BLE001 - every client raises its own tree
        raise translate(exc, uri) from None


def translate(exc: BaseException, uri: ModelUri) -> StorageError:
    names = {cls.__name__ for cls in type(exc).__mro__}
    status = getattr(exc, "status", None)
    where = endpoint_of(uri)
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
        return StorageError(
            f"cannot write the model at {uri} into the local cache: {exc.strerror}",
            fix="free disk space, lower KILN_CACHE_MAX_BYTES, or set KILN_CACHE_DIR to a "
            "larger disk",
        )
    if names & set(_NO_CREDENTIALS):
        return StorageAccessDenied(
            f"no credentials were found to read the model at {uri}",
            fix=_credentials_fix(uri),
        )
    if isinstance(exc, FileNotFoundError) or status == 404:
        return ModelNotFound(
            f"the model at {uri} does not exist ({where} has no such object or bucket)",
            fix="check the bucket and key in kiln.yaml, and that the model was uploaded there",
        )
    if isinstance(exc, PermissionError) or status in (401, 403):
        return StorageAccessDenied(
            f"{where} refused access to the model at {uri} ({_short(exc) or 'forbidden'})",
            fix=_credentials_fix(uri),
        )
    if names & set(_UNREACHABLE) or isinstance(exc, OSError | TimeoutError):
        return StorageUnreachable(
            f"cannot reach {where} to fetch the model at {uri} ({_short(exc)})",
            fix="check the network and the endpoint setting (AWS_ENDPOINT_URL, "
            "STORAGE_EMULATOR_HOST), or point `model` at a local copy of the model",
        )
    return StorageError(f"fetching the model at {uri} failed: {type(exc).__name__}: {_short(exc)}")


def _credentials_fix(uri: ModelUri) -> str:
    if uri.scheme == "s3":
        return (
            "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) in the "
            "environment of `kiln serve` to credentials allowed to read this object"
        )
    if uri.scheme == "gs":
        return (
            "set GOOGLE_APPLICATION_CREDENTIALS to a service account key file allowed "
            "to read this object, or run where the default credentials can"
        )
    return "make the URL readable without credentials, or download the model and use a local path"


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return text[:300]


def stat(fs: Any, uri: ModelUri) -> tuple[str, list[RemoteFile]]:
    """("file", [one]) for an object, ("dir", [every object under it]) for a prefix.

    One HEAD for an object, one listing for a folder: this is all a restart
    asks of the store when the cache already holds the bytes.
    """
    info = fs.info(uri.path)
    if info.get("type") == "directory":
        found = fs.find(uri.path, detail=True)
        root = fs._strip_protocol(uri.path).rstrip("/") + "/"
        files = [
            _remote_file(uri, name, entry, name[len(root) :])
            for name, entry in sorted(found.items())
            if entry.get("type") != "directory" and name.startswith(root)
        ]
        if not files:
            raise ModelNotFound(
                f"the model folder {uri} is empty", fix="upload the model's files under it"
            )
        return "dir", files
    return "file", [_remote_file(uri, info.get("name", uri.path), info, uri.name)]


def _remote_file(uri: ModelUri, name: str, info: dict[str, Any], rel: str) -> RemoteFile:
    size = int(info.get("size") or 0)
    md5: str | None = None
    if uri.scheme == "gs":
        identity = str(info.get("generation") or info.get("etag") or "")
        if info.get("md5Hash"):
            md5 = base64.b64decode(info["md5Hash"]).hex()
    elif uri.scheme == "s3":
        etag = str(info.get("ETag") or "").strip('"')
        identity = f"{etag}|{info.get('VersionId') or ''}"
        md5 = etag if _MD5_HEX.match(etag) else None
    else:
        identity = str(info.get("ETag") or info.get("Last-Modified") or "")
        if info.get("Content-MD5"):
            md5 = base64.b64decode(info["Content-MD5"]).hex()
    return RemoteFile(path=name, rel=rel, size=size, identity=f"{identity}|{size}", md5=md5)


def fetch(fs: Any, uri: ModelUri, remote: RemoteFile, dest: Path) -> str:
    """Download one object to `dest`, check its size (and MD5 where known); return its SHA-256."""
    target = remote.path if uri.scheme not in ("http", "https") else uri.path
    fs.get_file(target, str(dest))
    sha, md5, size = hashlib.sha256(), hashlib.md5(usedforsecurity=False), 0
    with open(dest, "rb") as f:
        while block := f.read(1 << 20):
            sha.update(block)
            md5.update(block)
            size += len(block)
    if remote.size and size != remote.size:
        raise ModelIntegrityError(
            f"the download of {uri} ({remote.rel}) has {size} bytes, the store said {remote.size}",
            fix="the object may have changed while it was read; start the API again",
        )
    if remote.md5 and md5.hexdigest() != remote.md5 and not _encrypted_etag(fs, uri, remote):
        raise ModelIntegrityError(
            f"the download of {uri} ({remote.rel}) does not match the MD5 checksum the store gave",
            fix="the object may have changed while it was read, or the transfer was damaged; "
            "start the API again",
        )
    return sha.hexdigest()


def _encrypted_etag(fs: Any, uri: ModelUri, remote: RemoteFile) -> bool:
    """S3 ETags are not MD5s for KMS- or customer-key-encrypted objects: ask, only on mismatch."""
    if uri.scheme != "s3" or not hasattr(fs, "call_s3"):
        return False
    bucket, _, key = remote.path.partition("/")
    try:
        head = fs.call_s3("head_object", Bucket=bucket, Key=key)
    except Exception:  # noqa: BLE001 - the mismatch is reported instead
        return False
    return str(head.get("ServerSideEncryption", "")).startswith("aws:kms") or bool(
        head.get("SSECustomerAlgorithm")
    )
