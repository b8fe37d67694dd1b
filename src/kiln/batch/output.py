"""The optional output sink: each item's result, written by Kiln, one file per batch.

The server decides where a job's output goes (`output_folder`, at submission):

- a local ``output.path`` must be relative; it resolves to
  ``KILN_HOME/jobs/<api>/<job_id>/<path>/`` for a deployed API, and to
  ``<project>/<path>/<job_id>/`` for ``kiln serve DIR``;
- an ``s3://`` or ``gs://`` path gets ``<path>/<job_id>/``.

``{folder}/part-{batch:06d}.jsonl`` holds one line per item,
``{"index": <item index in the job>, "result": ...}``. A batch's file appears
whole or not at all (written to a temporary name, then renamed; an object store
put is atomic by itself), and a batch that runs again after a retry or a crash
rewrites the same name. So a job's output is complete and holds every item once,
however often its batches were delivered. ``format: parquet`` writes
``part-{batch:06d}.parquet`` (columns ``index``, ``result`` as JSON text) and needs
pyarrow on the server.

Who writes: for a local folder, the worker (the server creates the folder and
hands it to the worker, the one place a sandboxed worker may write besides its
scratch folder); for a remote one, the server, with the bytes the worker encoded
and sent over its channel (the worker needs no network and no credentials).
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path
from typing import Any

import orjson

from kiln.serving.encoding import dumps


def is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


class OutputSink:
    """Encodes one job's results and writes them to its output folder."""

    def __init__(self, folder: str, fmt: str) -> None:
        self.format = fmt
        self.remote = is_remote(folder)
        self.folder = folder.rstrip("/") if self.remote else folder.removeprefix("file://")
        # One remote filesystem (S3/GCS client) per sink, made at the first write: a new
        # one per batch cost ~160 ms of CPU (botocore loads its service models) against
        # ~7 ms for the write itself (moto, measured), capping a job at a few batches/s.
        self._fs: Any = None
        self._fs_lock = threading.Lock()

    def name(self, idx: int) -> str:
        return f"{self.folder}/part-{idx:06d}.{self.format}"

    def encode(self, item_start: int, results: list[Any]) -> bytes:
        if self.format == "parquet":
            return _parquet(item_start, results)
        lines = [
            b'{"index":%d,"result":%s}\n' % (item_start + i, dumps(r))
            for i, r in enumerate(results)
        ]
        return b"".join(lines)

    def write(self, idx: int, data: bytes | memoryview) -> None:
        """Write one batch's encoded results atomically, replacing an earlier attempt's file."""
        target = self.name(idx)
        if self.remote:
            from kiln.storage.remote import filesystem
            from kiln.storage.uri import parse_uri

            uri = parse_uri(target)
            with self._fs_lock:
                if self._fs is None:
                    self._fs = filesystem(uri)
            with self._fs.open(uri.path, "wb") as f:
                f.write(bytes(data))
            return
        # A random suffix, not the pid: sandboxed workers each have their own PID namespace,
        # and two of them may write one batch at once (a lease that lapsed while it ran).
        tmp = f"{self.folder}/.part-{idx:06d}.{os.urandom(6).hex()}.tmp"
        try:
            with open(tmp, "wb") as f:  # no fsync: as durable as the store's WAL (see docs)
                f.write(data)
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


def job_output_folder(job_id: str, output: dict[str, str]) -> str:
    """Where a job's parts go: `folder`, fixed at submission (see `kiln.batch.spec`).

    A job submitted before the folder was stored keeps its old place, ``<path>/<job_id>``.
    """
    folder = output.get("folder")
    if folder:
        return folder
    return f"{output['path'].rstrip('/')}/{job_id}"


def _parquet(item_start: int, results: list[Any]) -> bytes:
    import io

    import pyarrow as pa  # type: ignore[import-untyped]  # pyarrow ships no type hints
    import pyarrow.parquet as pq  # type: ignore[import-untyped]  # no type hints

    table = pa.table(
        {
            "index": list(range(item_start, item_start + len(results))),
            "result": [dumps(r).decode() for r in results],
        }
    )
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    return buffer.getvalue()


def read_jsonl(folder: Path) -> list[dict[str, Any]]:
    """Every record of a job's jsonl output, in item order (tests and tools use this)."""
    records: list[dict[str, Any]] = []
    for part in sorted(folder.glob("part-*.jsonl")):
        records.extend(orjson.loads(line) for line in part.read_bytes().splitlines() if line)
    return sorted(records, key=lambda r: r["index"])
