"""The ``jobs:`` block of a ``kind: BatchAPI`` entry: limits and queue settings.

Cortex fixed these (a batch under 256 KiB, a submission under 10 MiB, SQS's
visibility timeout); Kiln keeps Cortex's values as defaults and lets an API
raise or lower them, because a local queue has no SQS message limit and tests
want short visibility timeouts.
"""

from __future__ import annotations

from pydantic import Field, field_validator

from kiln.config.blocks import _Block
from kiln.quantities import parse_bytes, parse_duration

KIB = 1024
MIB = 1024 * KIB


class JobsBlock(_Block):
    """Per-API limits for submitted jobs and the durable queue that runs them."""

    max_batch_bytes: int = Field(default=256 * KIB, ge=1)
    """A batch (its items as JSON) must be smaller than this (Cortex: 256 KiB)."""
    max_request_bytes: int = Field(default=10 * MIB, ge=1)
    """A job submission body must be smaller than this (Cortex: 10 MiB)."""
    max_workers: int = Field(default=32, ge=1)
    """The most workers one job may ask for."""
    visibility_timeout: float = Field(default=60.0, gt=0)
    """Seconds a claimed batch stays invisible; workers extend it while they run the batch,
    so it only matters when a worker dies: its batch is redelivered after this long."""
    max_receive_count: int = Field(default=3, ge=1)
    """Deliveries before a failing batch goes to the dead-letter set, unless the job's
    ``dead_letter`` (Cortex ``sqs_dead_letter_queue``) says otherwise."""
    max_worker_restarts: int = Field(default=5, ge=0)
    """Crashed workers restarted per job before the job ends in ``worker error``."""

    _bytes = field_validator("max_batch_bytes", "max_request_bytes", mode="before")(
        lambda v: parse_bytes(v, what="size") if isinstance(v, str) else v
    )
    _dur = field_validator("visibility_timeout", mode="before")(lambda v: parse_duration(v))
