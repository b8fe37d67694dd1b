"""Model storage: local paths, file://, s3://, gs://, http(s):// and hf://, through one cache.

`materialize(model)` is the one call the worker makes before loading a model.
The pieces, each with one job: `uri` (the forms a model path may take),
`remote` (fsspec clients and their errors), `cache` (the shared,
content-addressed, size-bounded folder), `archives` (safe unpacking),
`onnx_data` (external-data paths), `hf` (Hugging Face Hub snapshots).
"""

from __future__ import annotations

from kiln.storage.cache import Cache, CacheEntry, cache_dir
from kiln.storage.errors import (
    MissingStorageExtra,
    ModelIntegrityError,
    ModelNotFound,
    ModelUriError,
    StorageAccessDenied,
    StorageError,
    StorageUnreachable,
    UnsafeArchive,
)
from kiln.storage.materialize import default_cache, materialize
from kiln.storage.uri import ModelUri, is_remote, parse_uri

__all__ = [
    "Cache",
    "CacheEntry",
    "MissingStorageExtra",
    "ModelIntegrityError",
    "ModelNotFound",
    "ModelUri",
    "ModelUriError",
    "StorageAccessDenied",
    "StorageError",
    "StorageUnreachable",
    "UnsafeArchive",
    "cache_dir",
    "default_cache",
    "is_remote",
    "materialize",
    "parse_uri",
]
