"""Job statuses: Kiln's short codes, Cortex's wire names and the words people read.

The store keeps the short code; HTTP answers carry Cortex's wire name in
``status`` (``status_running``) so clients written for Cortex keep working, and
the display words in ``status_text`` (what Cortex's CLI printed).
"""

from __future__ import annotations

ENQUEUING = "enqueuing"
RUNNING = "running"
SUCCEEDED = "succeeded"
ENQUEUE_FAILED = "enqueue_failed"
COMPLETED_WITH_FAILURES = "completed_with_failures"
WORKER_ERROR = "worker_error"
WORKER_OOM = "worker_oom"
TIMED_OUT = "timed_out"
STOPPED = "stopped"

ACTIVE = (ENQUEUING, RUNNING)

DISPLAY = {
    ENQUEUING: "enqueuing",
    RUNNING: "running",
    SUCCEEDED: "succeeded",
    ENQUEUE_FAILED: "failed while enqueuing",
    COMPLETED_WITH_FAILURES: "completed with failures",
    WORKER_ERROR: "worker error",
    WORKER_OOM: "out of memory",
    TIMED_OUT: "timed out",
    STOPPED: "stopped",
}


def wire(status: str) -> str:
    """Cortex's JSON name: ``status_running``, ``status_worker_oom``, ..."""
    return f"status_{status}" if status in DISPLAY else "status_unknown"


def display(status: str) -> str:
    return DISPLAY.get(status, "unknown")


def is_active(status: str) -> bool:
    return status in ACTIVE
