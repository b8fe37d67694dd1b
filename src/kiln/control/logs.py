"""Structured logs: one JSON line per event, per API, and a readable echo on a terminal.

Each API has its own file (`KILN_HOME/logs/<api>.log`) so `kiln logs API` and
users' log shippers read one API at a time; stderr gets the same records,
as JSON when it is a pipe (for collectors) and as text when a person watches.
"""

from __future__ import annotations

import io
import re
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

import orjson

# What a worker appends to a line about a traced request (serving/worker_trace.py `trace_note`).
_TRACE_NOTE = re.compile(r" trace_id=([0-9a-f]{32}) span_id=([0-9a-f]{16})")


def worker_record(line: str, replica: str | None = None) -> dict[str, Any]:
    """The record of one line a worker wrote; a line about a traced request gets the
    request's `trace_id` and `span_id` as fields of their own (for log-trace correlation)."""
    record: dict[str, Any] = {"event": "worker", "message": line}
    if replica is not None:
        record["replica"] = replica
    if "trace_id=" in line:
        found = _TRACE_NOTE.search(line)
        if found is not None:
            record["trace_id"], record["span_id"] = found.group(1), found.group(2)
    return record


class LogSink:
    """Writes records for every API; thread-safe, line-buffered, append-only."""

    def __init__(self, folder: Path, stream: IO[str] | None = None, quiet: bool = False) -> None:
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self._files: dict[str, IO[bytes]] = {}
        self._lock = threading.Lock()
        self._stream = stream if stream is not None else sys.stderr
        self._pretty = bool(getattr(self._stream, "isatty", lambda: False)())
        # stderr is line-buffered even when it is a pipe (Python 3.9+): one system call
        # per record. For machines (not a terminal) write JSON through our own buffer,
        # flushed with the files a few times a second.
        self._raw: IO[bytes] | None = None
        if not self._pretty:
            try:
                self._raw = io.BufferedWriter(
                    io.FileIO(self._stream.fileno(), "w", closefd=False), 1 << 16
                )
            except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
                self._raw = None
        self._quiet = quiet

    def path_for(self, api: str) -> Path:
        return self.folder / f"{api}.log"

    def write(self, api: str, record: dict[str, Any]) -> None:
        self.write_many([(api, record)])

    def write_many(self, records: list[tuple[str, dict[str, Any]]]) -> None:
        """(api, record) pairs, in order: one write per API file and one echo, under one lock
        (protocols/bookkeeping.py hands over a loop turn's request lines at once)."""
        ts = round(time.time(), 3)
        lines: dict[str, list[bytes]] = {}
        stamped = []
        for api, record in records:
            record = {"ts": ts, "api": api, **record}
            line = orjson.dumps(record, default=str) + b"\n"
            lines.setdefault(api, []).append(line)
            stamped.append((record, line))
        with self._lock:
            for api, chunk in lines.items():
                file = self._files.get(api)
                if file is None:
                    file = self._files[api] = open(self.path_for(api), "ab")  # noqa: SIM115
                file.write(b"".join(chunk))
            if not self._quiet:
                self._echo(stamped)

    def _echo(self, stamped: list[tuple[dict[str, Any], bytes]]) -> None:
        try:
            if self._pretty:
                self._stream.write("".join(_human(record) + "\n" for record, _ in stamped))
            elif self._raw is not None:
                self._raw.write(b"".join(line for _, line in stamped))
            else:
                self._stream.write(b"".join(line for _, line in stamped).decode())
        except (OSError, ValueError):
            pass

    def flush(self) -> None:
        """Push buffered records out; the server calls this a few times a second.

        Buffering saves two system calls per request on the hot path; a record
        reaches its file within one flush interval.
        """
        with self._lock:
            for file in self._files.values():
                try:
                    file.flush()
                except (OSError, ValueError):
                    pass
            try:
                if self._raw is not None:
                    self._raw.flush()
                self._stream.flush()
            except (OSError, ValueError):
                pass

    def close(self) -> None:
        self.flush()
        with self._lock:
            for file in self._files.values():
                file.close()
            self._files.clear()


def _human(record: dict[str, Any]) -> str:
    stamp = time.strftime("%H:%M:%S", time.localtime(record["ts"]))
    if record.get("event") == "request":
        trace = f" trace={record['trace_id']}" if "trace_id" in record else ""
        return (
            f"{stamp} {record['api']:<16} {record.get('method', '')} {record.get('path', '')} "
            f"{record.get('status')} {record.get('latency_ms')}ms id={record.get('request_id')}"
            f"{trace}"
        )
    if record.get("event") == "debug":
        return f"{stamp} {record['api']:<16} debug [{record['stage']}] {record['value']}"
    return f"{stamp} {record['api']:<16} {record.get('message', '')}"
