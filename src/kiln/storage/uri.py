"""Model paths: which store a `model:` value names, checked for form before anything runs.

Pure string work with no imports of any storage client, so the config loader
can validate every model path (and refuse credentials written into one)
before the server starts, and `kiln` keeps starting fast.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from kiln.storage.errors import ModelUriError

REMOTE_SCHEMES = ("s3", "gs", "gcs", "http", "https", "hf")
"""Schemes fetched into the cache; `file://` and bare paths are read in place."""

ARCHIVE_SUFFIXES = (".zip", ".tar.gz", ".tgz", ".tar")

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9._\-]{1,221}[a-z0-9]$")
_HF_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,95}$")
_FORMS = "a local path, file://, s3://bucket/key, gs://bucket/key, http(s)://... or hf://org/repo"
_SECRETS_FIX = (
    "remove them from the path: Kiln reads storage credentials only from the environment "
    "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE for s3://, "
    "GOOGLE_APPLICATION_CREDENTIALS for gs://, HF_TOKEN for hf://), never from kiln.yaml"
)


@dataclass(frozen=True)
class ModelUri:
    """One parsed model path.

    `path` is what the store's client takes: an absolute local path for
    `file`, `bucket/key` for s3 and gs, the whole URL for http(s), and
    `org/repo` for hf (with `revision` apart).
    """

    raw: str
    scheme: str
    path: str
    revision: str | None = None

    @property
    def remote(self) -> bool:
        return self.scheme != "file"

    @property
    def name(self) -> str:
        """The last path segment: the file name a model keeps once it is local."""
        return self.path.rstrip("/").rsplit("/", 1)[-1] or "model"

    @property
    def is_archive(self) -> bool:
        return self.name.lower().endswith(ARCHIVE_SUFFIXES)

    def __str__(self) -> str:
        return self.raw


def scheme_of(value: str) -> str | None:
    """The URI scheme, lower-cased; None for a plain path (a one-letter "scheme" is a drive)."""
    match = _SCHEME.match(value)
    if not match or len(match.group(1)) == 1:
        return None
    return match.group(1).lower()


def is_remote(value: str | None) -> bool:
    """Whether `value` names something fetched over the network rather than a local path."""
    if not value:
        return False
    scheme = scheme_of(value)
    return scheme is not None and scheme != "file"


def parse_uri(value: str, base: str | Path | None = None) -> ModelUri:
    """Check one model path's form and split it; ModelUriError says what is wrong and how to fix it.

    Relative local paths are resolved against `base` (the folder holding the
    config), as the config loader does.
    """
    text = value.strip()
    if not text:
        raise ModelUriError("the model path is empty", fix=f"write {_FORMS}")
    if "\x00" in text:
        raise ModelUriError(f"the model path {value!r} contains a NUL byte", fix="remove it")
    scheme = scheme_of(text)
    if scheme is None or scheme == "file":
        local = text[len("file://") :] if scheme == "file" else text
        p = Path(os.path.expanduser(local))
        if not p.is_absolute() and base is not None:
            p = Path(base) / p
        return ModelUri(raw=value, scheme="file", path=os.path.abspath(p))
    if scheme not in REMOTE_SCHEMES:
        raise ModelUriError(
            f"the model path {value!r} uses the scheme '{scheme}://', which Kiln cannot fetch",
            fix=f"use {_FORMS}; or download the model and point `model` at the local copy",
        )
    parts = urlsplit(text)
    if "@" in parts.netloc:
        raise ModelUriError(
            f"the model path {_redact(text)} has credentials written into it (user:password@)",
            fix=_SECRETS_FIX,
        )
    if scheme in ("http", "https"):
        if not parts.hostname:
            raise ModelUriError(
                f"the model URL {value!r} has no host", fix="write https://host/path/model.onnx"
            )
        return ModelUri(raw=value, scheme=scheme, path=text)
    if scheme == "hf":
        return _parse_hf(value, parts.netloc, parts.path)
    return _parse_bucket(value, "gs" if scheme == "gcs" else scheme, parts.netloc, parts.path)


def _parse_bucket(value: str, scheme: str, bucket: str, key: str) -> ModelUri:
    example = f"{scheme}://my-bucket/models/model.onnx"
    if not _BUCKET.match(bucket):
        raise ModelUriError(
            f"the model path {value!r} does not name a valid bucket ('{bucket}')",
            fix=f"bucket names are 3-63 lower-case letters, digits, dots and dashes: {example}",
        )
    key = key.lstrip("/")
    if not key.strip("/"):
        raise ModelUriError(
            f"the model path {value!r} names a whole bucket",
            fix=f"name the model file or folder inside it: {example}",
        )
    if any(part in ("..", ".") for part in key.split("/")):
        raise ModelUriError(
            f"the model path {value!r} has '.' or '..' segments",
            fix="write the object's key exactly as it is stored, without relative segments",
        )
    return ModelUri(raw=value, scheme=scheme, path=f"{bucket}/{key}")


def _parse_hf(value: str, org: str, rest: str) -> ModelUri:
    repo, _, revision = rest.lstrip("/").partition("@")
    repo = repo.strip("/")
    if not (_HF_PART.match(org or "") and _HF_PART.match(repo or "")):
        raise ModelUriError(
            f"the model path {value!r} is not of the form hf://org/repo[@revision]",
            fix="write e.g. hf://sentence-transformers/all-MiniLM-L6-v2@main",
        )
    return ModelUri(raw=value, scheme="hf", path=f"{org}/{repo}", revision=revision or None)


def _redact(text: str) -> str:
    """The URI with its user-info replaced, so an error message never repeats a secret."""
    parts = urlsplit(text)
    host = parts.netloc.rsplit("@", 1)[-1]
    return f"'{parts.scheme}://***@{host}{parts.path}'"
