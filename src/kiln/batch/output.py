"""The optional output sink: each item's result, written by Kiln, one file per batch.

``{output.path}/{job_id}/part-{batch:06d}.jsonl`` holds one line per item,
``{"index": <item index in the job>, "result": ...}``. A batch's file appears
whole or not at all (written to a temporary name, then renamed; an object store
put is atomic by itself), and a batch that runs again after a retry or a crash
rewrites the same name. So a job's output is complete and holds every item once,
however often its batches were delivered. ``format: parquet`` writes
``part-{batch:06d}.parquet`` (columns ``index``, ``result`` as JSON text) and needs
pyarrow on the server.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import orjson

from kiln.serving.encoding import dumps


class OutputSink:
    """Writes one job's results."""

    def __init__(self, path: str, fmt: str, job_id: str) -> None:
        self.format = fmt
        self.remote = "://" in path and not path.startswith("file://")
        base = path.rstrip("/") if self.remote else path.removeprefix("file://")
        self.folder = f"{base}/{job_id}"
        if not self.remote:
            Path(self.folder).mkdir(parents=True, exist_ok=True)

    def name(self, idx: int) -> str:
        return f"{self.folder}/part-{idx:06d}.{self.format}"

    def write(self, idx: int, item_start: int, results: list[Any]) -> None:
        """Write one batch's results atomically, replacing an earlier attempt's file."""
        data = self._encode(item_start, results)
        target = self.name(idx)
        if self.remote:
            from kiln.storage.remote import filesystem
            from kiln.storage.uri import parse_uri

            uri = parse_uri(target)
            with filesystem(uri).open(uri.path, "wb") as f:
                f.write(data)
            return
        tmp = f"{self.folder}/.part-{idx:06d}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:  # no fsync: as durable as the store's WAL (see docs)
            f.write(data)
        os.replace(tmp, target)

    def _encode(self, item_start: int, results: list[Any]) -> bytes:
        if self.format == "parquet":
            return _parquet(item_start, results)
        lines = [
            b'{"index":%d,"result":%s}\n' % (item_start + i, dumps(r))
            for i, r in enumerate(results)
        ]
        return b"".join(lines)


def _parquet(item_start: int, results: list[Any]) -> bytes:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

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
