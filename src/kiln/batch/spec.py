"""Validating a job submission: Cortex's keys, exactly one source, and the API's limits.

Every problem is a 400 (`InvalidInput`) that names the key or the limit, so a
client sees at once what to change. Limits come from the API's ``jobs:`` block
(Cortex's values by default: a batch under 256 KiB, a submission under 10 MiB).
"""

from __future__ import annotations

import importlib.util
import os
import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from kiln.errors import InvalidInput

SOURCES = ("item_list", "file_path_lister", "delimited_files")
KNOWN_KEYS = (
    "workers",
    "config",
    "timeout",
    "dead_letter",
    "sqs_dead_letter_queue",
    "output",
    "node_groups",  # Cortex 0.3x scheduling hint; accepted and ignored locally
    *SOURCES,
)
FORMATS = ("jsonl", "parquet")


@dataclass
class Limits:
    """The API's limits for jobs (its kiln.yaml ``jobs:`` block)."""

    max_batch_bytes: int = 256 * 1024
    max_request_bytes: int = 10 * 1024 * 1024
    max_workers: int = 32
    max_receive_count: int = 3


@dataclass
class JobSpec:
    """A validated submission."""

    workers: int
    source: str  # one of SOURCES
    batch_size: int
    items: list[Any] | None = None  # item_list
    paths: list[str] = field(default_factory=list)  # file sources
    includes: list[str] = field(default_factory=list)
    excludes: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    timeout: float | None = None
    max_receive_count: int = 3
    output: dict[str, str] | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """What is stored with the job (everything a resumed enqueuer needs)."""
        return {
            "workers": self.workers,
            "source": self.source,
            "batch_size": self.batch_size,
            "items": self.items,
            "paths": self.paths,
            "includes": self.includes,
            "excludes": self.excludes,
            "config": self.config,
            "timeout": self.timeout,
            "max_receive_count": self.max_receive_count,
            "output": self.output,
            "raw": self.raw,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> JobSpec:
        return cls(**data)


def _bad(message: str) -> InvalidInput:
    return InvalidInput(message)


def _whole(value: Any, key: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
        raise _bad(f"{key} must be a whole number, got {orjson.dumps(value).decode()[:60]}")
    if value < minimum:
        raise _bad(f"{key} must be at least {minimum}, got {int(value)}")
    return int(value)


def _strings(value: Any, key: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _bad(f"{key} must be a list of strings")
    return list(value)


def parse_body(body: bytes, limits: Limits) -> dict[str, Any]:
    """The submission as a dict; over-size and non-JSON bodies are 400s."""
    if len(body) > limits.max_request_bytes:
        raise _bad(
            f"the job submission is {len(body)} bytes, over the request limit of "
            f"{_size(limits.max_request_bytes)} (jobs.max_request_bytes); put the items in "
            f"files and submit delimited_files or file_path_lister instead of item_list"
        )
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise _bad(f"the job submission is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise _bad('the job submission must be a JSON object, e.g. {"workers": 1, ...}')
    return data


def validate(data: dict[str, Any], limits: Limits, api_config: dict[str, Any]) -> JobSpec:
    """Check a submission against Cortex's contract and the API's limits."""
    unknown = sorted(set(data) - set(KNOWN_KEYS))
    if unknown:
        raise _bad(
            f"unknown key(s) in the job submission: {', '.join(unknown)}; "
            f"the keys are {', '.join(KNOWN_KEYS)}"
        )
    if "workers" not in data:
        raise _bad("workers is required: how many worker processes run the job, e.g. 1")
    workers = _whole(data["workers"], "workers")
    if workers > limits.max_workers:
        raise _bad(
            f"workers is {workers}, over this API's limit of {limits.max_workers} "
            f"(jobs.max_workers in kiln.yaml)"
        )
    given = [s for s in SOURCES if data.get(s) is not None]
    if len(given) != 1:
        which = ", ".join(given) if given else "none"
        raise _bad(
            f"a job needs exactly one data source (item_list, file_path_lister or "
            f"delimited_files); this one has {which}"
        )
    source = given[0]
    block = data[source]
    if not isinstance(block, dict):
        raise _bad(f"{source} must be an object")
    if "batch_size" not in block:
        raise _bad(f"{source}.batch_size is required: how many items go in one batch")
    batch_size = _whole(block["batch_size"], f"{source}.batch_size")
    config = data.get("config") or {}
    if not isinstance(config, dict):
        raise _bad("config must be an object; it is merged over the API's config")
    spec = JobSpec(
        workers=workers,
        source=source,
        batch_size=batch_size,
        config={**api_config, **config},
        max_receive_count=limits.max_receive_count,
        raw=data,
    )
    if data.get("timeout") is not None:
        spec.timeout = float(_whole(data["timeout"], "timeout"))
    _dead_letter(data, spec)
    if source == "item_list":
        _item_list(block, spec, limits)
    else:
        _file_source(source, block, spec)
    if data.get("output") is not None:
        spec.output = _output(data["output"])
    return spec


def _dead_letter(data: dict[str, Any], spec: JobSpec) -> None:
    for key in ("dead_letter", "sqs_dead_letter_queue"):
        block = data.get(key)
        if block is None:
            continue
        if not isinstance(block, dict) or "max_receive_count" not in block:
            raise _bad(f"{key} must be an object with max_receive_count (at least 1)")
        spec.max_receive_count = _whole(block["max_receive_count"], f"{key}.max_receive_count")


def _item_list(block: dict[str, Any], spec: JobSpec, limits: Limits) -> None:
    extra = sorted(set(block) - {"items", "batch_size"})
    if extra:
        raise _bad(f"unknown key(s) in item_list: {', '.join(extra)}; use items and batch_size")
    items = block.get("items")
    if not isinstance(items, list) or not items:
        raise _bad("item_list.items must be a non-empty list of items")
    for start in range(0, len(items), spec.batch_size):
        size = len(orjson.dumps(items[start : start + spec.batch_size]))
        if size > limits.max_batch_bytes:
            raise _bad(
                f"batch {start // spec.batch_size} (items {start} to "
                f"{min(start + spec.batch_size, len(items)) - 1}) is {size} bytes, over the "
                f"batch limit of {_size(limits.max_batch_bytes)} (jobs.max_batch_bytes); "
                f"use a smaller batch_size"
            )
    spec.items = items


def _file_source(source: str, block: dict[str, Any], spec: JobSpec) -> None:
    extra = sorted(set(block) - {"s3_paths", "paths", "includes", "excludes", "batch_size"})
    if extra:
        raise _bad(
            f"unknown key(s) in {source}: {', '.join(extra)}; use paths (or Cortex's "
            f"s3_paths), includes, excludes and batch_size"
        )
    if block.get("paths") is not None and block.get("s3_paths") is not None:
        raise _bad(f"{source} has both paths and s3_paths; give one of them")
    key = "paths" if block.get("paths") is not None else "s3_paths"
    paths = _strings(block.get(key), f"{source}.{key}")
    if not paths:
        raise _bad(f"{source}.{key} must list at least one file, folder or s3:// prefix")
    spec.paths = paths
    spec.includes = _strings(block.get("includes"), f"{source}.includes")
    spec.excludes = _strings(block.get("excludes"), f"{source}.excludes")


def _output(block: Any) -> dict[str, str]:
    if not isinstance(block, dict) or not isinstance(block.get("path"), str) or not block["path"]:
        raise _bad('output must be an object with a path, e.g. {"path": "results/"}')
    extra = sorted(set(block) - {"path", "format"})
    if extra:
        raise _bad(f"unknown key(s) in output: {', '.join(extra)}; use path and format")
    fmt = block.get("format") or "jsonl"
    if fmt not in FORMATS:
        raise _bad(f"output.format must be jsonl or parquet, got {fmt!r}")
    _check_output_path(block["path"])
    if fmt == "parquet" and importlib.util.find_spec("pyarrow") is None:
        raise _bad(
            "output.format parquet needs pyarrow, which is not installed on the server; "
            "install it there (pip install pyarrow) or use format jsonl"
        )
    return {"path": block["path"], "format": fmt}


def _remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def _check_output_path(path: str) -> str:
    """A local output.path, normalized: relative and inside the job's folder, or a 400."""
    if _remote(path):
        return path
    local = path.removeprefix("file://")
    if local.startswith("~") or os.path.isabs(local):
        raise _bad(
            f"output.path must be relative, got {path!r}: a job's local output goes under "
            f'the server\'s folder for the job (give e.g. "results/"), or use s3:// or gs://'
        )
    normal = posixpath.normpath(local)
    if normal == ".." or normal.startswith("../"):
        raise _bad(
            f"output.path {path!r} leaves the job's output folder; give a relative path "
            f"without '..' (e.g. \"results/\"), or use s3:// or gs://"
        )
    return normal


def output_folder(
    path: str, job_id: str, api: str, *, project: Path | None, jobs_home: Path
) -> str:
    """The absolute folder a job's output goes to (where the status document shows it).

    Remote: ``<path>/<job_id>``. Local, for ``kiln serve DIR`` (`project` given):
    ``<project>/<path>/<job_id>``; for a deployed API: ``<jobs_home>/<api>/<job_id>/<path>``
    (`jobs_home` is ``KILN_HOME/jobs``). A path that leads outside (``..``, or a
    symbolic link out of the base) is a 400 naming ``output.path``.
    """
    if _remote(path):
        return f"{path.rstrip('/')}/{job_id}"
    relative = _check_output_path(path)
    if project is not None:
        base = project.resolve()
        folder = (base / relative / job_id).resolve()
    else:
        base = (jobs_home / api / job_id).resolve()
        folder = (base / relative).resolve()
    if not folder.is_relative_to(base):
        raise _bad(
            f"output.path {path!r} leads outside the job's output folder (to {folder}, "
            f"through a symbolic link); give another relative path"
        )
    return str(folder)


def resolve_local(path: str, root: Path) -> str:
    """A local path as the server reads it: relative paths are relative to the project."""
    if "://" in path and not path.startswith("file://"):
        return path
    local = Path(path.removeprefix("file://")).expanduser()
    return str(local if local.is_absolute() else (root / local).resolve())


def _size(n: int) -> str:
    if n % (1024 * 1024) == 0:
        return f"{n // (1024 * 1024)} MiB"
    if n % 1024 == 0:
        return f"{n // 1024} KiB"
    return f"{n} bytes"
