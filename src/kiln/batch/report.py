"""The job status document: Cortex's shape, plus progress and an ETA.

``{"job_status": {...}, "endpoint", "api_spec", "metrics": {succeeded, failed,
avg_time_per_batch}, "progress": {...}}``, where ``job_status`` holds the job
spec (its ``output`` with ``location``: the absolute folder the parts go to),
``status`` (Cortex's wire name, e.g. ``status_running``), ``status_text``
(``running``), ``total_batch_count``, ``batches_in_queue``, ``worker_counts``
(while running) and RFC 3339 times with nanoseconds, as Cortex wrote them.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import orjson

from kiln.batch import statuses as st
from kiln.batch.output import job_output_folder
from kiln.control.store.jobs import JobRow


def rfc3339(at: float | None) -> str | None:
    """1700000000.5 -> '2023-11-14T22:13:20.500000000Z' (Cortex's nanosecond form)."""
    if at is None:
        return None
    whole = int(at)
    nanos = int(round((at - whole) * 1e9))
    if nanos >= 1_000_000_000:
        whole, nanos = whole + 1, nanos - 1_000_000_000
    stamp = datetime.fromtimestamp(whole, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{stamp}.{nanos:09d}Z"


def job_spec_document(job: JobRow, endpoint: str | None) -> dict[str, Any]:
    """What a submission returns (Cortex's job spec), without the bulky item list."""
    spec = orjson.loads(job.spec)
    raw: dict[str, Any] = dict(spec["raw"])
    if "item_list" in raw:
        raw["item_list"] = {
            "batch_size": spec["batch_size"],
            "item_count": len(spec["items"] or []),
        }
    if spec.get("output"):  # the path as given, and where the parts really go
        location = job_output_folder(job.id, spec["output"]).rstrip("/") + "/"
        raw["output"] = {**spec["output"], **raw.get("output", {}), "location": location}
        raw["output"].pop("folder", None)
    return {
        **raw,
        "job_id": job.id,
        "api_name": job.api,
        "kind": "BatchAPI",
        "workers": job.workers,
        "config": spec["config"],
        "api_id": f"{job.api}-{orjson.loads(job.plan).get('revision') or 'local'}",
        "sqs_url": None,
        "timeout": int(job.timeout) if job.timeout is not None else None,
        "dead_letter": {"max_receive_count": job.max_receive_count},
        "created_time": rfc3339(job.created_at),
        "endpoint": endpoint,
    }


def progress(job: JobRow, now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    done_items = job.succeeded_items + job.failed_items
    done_batches = job.succeeded + job.failed
    total_items = job.enqueued_items if job.enqueue_done else None
    total_batches = job.enqueued_batches if job.enqueue_done else None
    started = job.started_at
    end = job.ended_at or now
    rate = done_items / (end - started) if started and end > started and done_items else None
    eta = None
    if job.active and total_items is not None and rate:
        eta = round(max(total_items - done_items, 0) / rate, 1)
    percent = None
    if total_items:
        percent = round(100.0 * done_items / total_items, 2)
    return {
        "batches_done": done_batches,
        "total_batches": total_batches,
        "items_done": done_items,
        "total_items": total_items,
        "enqueued_batches": job.enqueued_batches,
        "enqueued_items": job.enqueued_items,
        "percent": percent,
        "items_per_second": round(rate, 1) if rate else None,
        "eta_seconds": eta,
    }


def job_status(
    job: JobRow,
    *,
    endpoint: str | None,
    api_spec: dict[str, Any] | None,
    worker_counts: dict[str, int] | None,
    queued: tuple[int, int],
) -> dict[str, Any]:
    document = job_spec_document(job, endpoint)
    document.pop("endpoint", None)
    document.update(
        status=st.wire(job.status),
        status_text=st.display(job.status),
        total_batch_count=job.enqueued_batches if job.enqueue_done else None,
        batches_in_queue=queued[0] + queued[1],
        batches_in_flight=queued[1],
        worker_counts=worker_counts if job.status == st.RUNNING else None,
        start_time=rfc3339(job.started_at),
        end_time=rfc3339(job.ended_at),
        error=job.error,
    )
    average = job.batch_seconds / job.succeeded if job.succeeded else None
    return {
        "job_status": document,
        "endpoint": endpoint,
        "api_spec": api_spec,
        "metrics": {
            "succeeded": job.succeeded,
            "failed": job.failed,
            "avg_time_per_batch": round(average, 6) if average is not None else None,
        },
        "progress": progress(job),
    }


def job_summary(job: JobRow) -> dict[str, Any]:
    """One line of a job listing (what `kiln jobs list` shows)."""
    p = progress(job)
    end = job.ended_at or (time.time() if job.started_at else None)
    return {
        "job_id": job.id,
        "status": st.wire(job.status),
        "status_text": st.display(job.status),
        "batches_done": p["batches_done"],
        "total_batches": p["total_batches"],
        "failed": job.failed,
        "created_time": rfc3339(job.created_at),
        "start_time": rfc3339(job.started_at),
        "duration_s": round(end - job.started_at, 3) if job.started_at and end else None,
    }
