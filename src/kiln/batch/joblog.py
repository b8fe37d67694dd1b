"""Each job's log: JSON lines in ``KILN_HOME/logs/jobs/<api>/<job_id>.log``.

One file per job (Cortex's ``cortex logs API JOB_ID``): enqueue progress, every
worker's output tagged with its worker number, restarts, and the final status.
A file is open only while its job runs, so finished jobs hold no descriptors.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import IO, Any

import orjson


def job_log_path(folder: Path, api: str, job_id: str) -> Path:
    return folder / "jobs" / api / f"{job_id}.log"


class JobLog:
    """Appends records for one job; thread-safe (the enqueuer writes from a thread)."""

    def __init__(self, folder: Path, api: str, job_id: str) -> None:
        self.path = job_log_path(folder, api, job_id)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.api, self.job_id = api, job_id
        self._file: IO[bytes] | None = open(self.path, "ab")  # noqa: SIM115
        self._lock = threading.Lock()

    def write(self, message: str, **fields: Any) -> None:
        record = {"ts": round(time.time(), 3), "api": self.api, "job_id": self.job_id}
        record.update(fields)
        record["message"] = message
        line = orjson.dumps(record, default=str) + b"\n"
        with self._lock:
            if self._file is not None:
                self._file.write(line)

    def flush(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.flush()

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
