"""Turning a job's data source into batches, streamed: never the whole dataset in memory.

- ``item_list``: the submitted items, ``batch_size`` at a time.
- ``file_path_lister``: the matching file paths, ``batch_size`` paths per batch.
- ``delimited_files``: every matching file read line by line as JSON lines, one
  item per line, ``batch_size`` items per batch (batches may span files).

Paths are local files or folders (relative ones are relative to the project
folder), ``file://`` URLs, or ``s3://`` / ``gs://`` prefixes read through
:mod:`kiln.storage` (fsspec, credentials from the environment). Listings are
sorted, so the same source always gives the same batches: that is what lets a
restarted server resume enqueuing at the batch where it stopped.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import orjson

from kiln.batch.globs import keep
from kiln.batch.spec import JobSpec, Limits, _size, resolve_local
from kiln.control.store.jobs import QueuedBatch
from kiln.errors import InvalidInput, KilnError


class SourceError(KilnError):
    """The job's data could not be read or split (the job ends `failed while enqueuing`)."""

    status = 400
    type = "SourceError"


def _is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def check_paths(spec: JobSpec, root: Path) -> None:
    """At submission: local paths must exist (a 400 then beats a failed job later)."""
    for path in spec.paths:
        if _is_remote(path):
            continue
        local = resolve_local(path, root)
        if not Path(local).exists():
            raise InvalidInput(
                f"{spec.source} path {path!r} does not exist on the server (looked at "
                f"{local}); relative paths are relative to the project folder"
            )


def list_files(spec: JobSpec, root: Path) -> list[str]:
    """Every file under the job's paths that passes includes/excludes, sorted, no repeats."""
    seen: set[str] = set()
    out: list[str] = []
    for path in spec.paths:
        for full, relative in _expand(path, root):
            if full not in seen and keep(full, relative, spec.includes, spec.excludes):
                seen.add(full)
                out.append(full)
    return out


def _expand(path: str, root: Path) -> Iterator[tuple[str, str]]:
    if _is_remote(path):
        yield from _expand_remote(path)
        return
    local = Path(resolve_local(path, root))
    if local.is_file():
        yield str(local), local.name
    elif local.is_dir():
        files = sorted(p for p in local.rglob("*") if p.is_file())
        for file in files:
            yield str(file), file.relative_to(local).as_posix()
    else:
        raise SourceError(f"path {path!r} does not exist on the server (looked at {local})")


def _expand_remote(path: str) -> Iterator[tuple[str, str]]:
    from kiln.storage.remote import filesystem, storage_errors
    from kiln.storage.uri import parse_uri

    uri = parse_uri(path)
    scheme = path.split("://", 1)[0]
    with storage_errors(uri):
        fs = filesystem(uri)
        base = uri.path.rstrip("/")
        if fs.isfile(base):
            yield path, base.rsplit("/", 1)[-1]
            return
        found = sorted(fs.find(base))
    for name in found:
        yield f"{scheme}://{name}", name[len(base) :].lstrip("/")


def _open(path: str) -> IO[bytes]:
    if _is_remote(path):
        from kiln.storage.remote import filesystem
        from kiln.storage.uri import parse_uri

        uri = parse_uri(path)
        return filesystem(uri).open(uri.path, "rb")  # type: ignore[no-any-return]
    return open(path.removeprefix("file://"), "rb")  # noqa: SIM115


def _lines(files: Iterable[str]) -> Iterator[bytes]:
    """Each non-blank line of each file, checked to be one JSON value."""
    for path in files:
        try:
            handle = _open(path)
        except OSError as exc:
            raise SourceError(f"cannot read {path}: {exc.strerror or exc}") from None
        with handle:
            for number, line in enumerate(handle, 1):
                line = line.strip()
                if not line:
                    continue
                try:
                    orjson.loads(line)
                except orjson.JSONDecodeError as exc:
                    raise SourceError(
                        f"{path} line {number} is not valid JSON ({exc}); delimited_files "
                        f"reads JSON lines: one JSON object per line"
                    ) from None
                yield line


def _item_payloads(spec: JobSpec, root: Path) -> Iterator[list[bytes]]:
    """Lists of encoded items, one list per batch."""
    size = spec.batch_size
    if spec.source == "item_list":
        items = spec.items or []
        for start in range(0, len(items), size):
            yield [orjson.dumps(item) for item in items[start : start + size]]
        return
    files = list_files(spec, root)
    if not files:
        raise SourceError(
            f"no files matched: {spec.source} found nothing under {', '.join(spec.paths)}"
            + (" after includes/excludes" if spec.includes or spec.excludes else "")
        )
    source: Iterable[bytes] = (
        (orjson.dumps(f) for f in files) if spec.source == "file_path_lister" else _lines(files)
    )
    chunk: list[bytes] = []
    for encoded in source:
        chunk.append(encoded)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def iter_batches(
    spec: JobSpec, root: Path, limits: Limits, start: int = 0
) -> Iterator[QueuedBatch]:
    """The job's batches from batch number `start` on (earlier ones are skipped, not kept)."""
    item_start = 0
    for idx, chunk in enumerate(_item_payloads(spec, root)):
        count = len(chunk)
        if idx >= start:
            payload = b"[" + b",".join(chunk) + b"]"
            if len(payload) > limits.max_batch_bytes:
                raise SourceError(
                    f"batch {idx} (items {item_start} to {item_start + count - 1}) is "
                    f"{len(payload)} bytes, over the batch limit of "
                    f"{_size(limits.max_batch_bytes)} (jobs.max_batch_bytes); use a smaller "
                    f"batch_size"
                )
            yield QueuedBatch(idx, item_start, count, payload)
        item_start += count


def dry_run(spec: JobSpec, root: Path) -> dict[str, Any]:
    """What `?dryRun=true` answers: the files a job would read, or its batch count."""
    if spec.source == "item_list":
        items = len(spec.items or [])
        return {"dry_run": True, "items": items, "batches": -(-items // spec.batch_size)}
    files = list_files(spec, root)
    return {"dry_run": True, "files": files, "file_count": len(files)}
