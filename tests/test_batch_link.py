"""The Batch API's queue link (batch/link.py): a slow output write keeps its batch's lease.

A real state store (SQLite) with a real job; the link's write runs with a sink whose
write takes longer than the lease, while another claimer tries to take the batch.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import orjson
from support import write

from kiln.batch.link import QueueLink
from kiln.batch.sources import iter_batches
from kiln.batch.spec import Limits, output_folder, parse_body, validate
from kiln.batch.workers import worker_plan
from kiln.config import load_project
from kiln.control.store import Store

LEASE_S = 0.6


class SlowSink:
    """A remote output whose writes take `seconds` (an S3 upload on a slow link)."""

    remote = True

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.written: list[int] = []

    def write(self, idx: int, data: Any) -> None:
        time.sleep(self.seconds)
        self.written.append(idx)

    def name(self, idx: int) -> str:
        return f"s3://bucket/part-{idx}"


def _job(store: Store, root: Path) -> str:
    write(
        root / "predictor.py",
        "class PythonPredictor:\n    def predict(self, payload):\n        pass\n",
    )
    write(
        root / "kiln.yaml",
        "- kind: BatchAPI\n  name: scorer\n  predictor: {type: python, path: predictor.py}\n",
    )
    job_id = f"link{os.urandom(4).hex()}"
    api = load_project(root).batch_api("scorer")
    assert api is not None
    limits = Limits(max_workers=api.jobs.max_workers)
    body = {
        "workers": 1,
        "item_list": {"items": list(range(4)), "batch_size": 2},
        "output": {"path": "out"},
    }
    spec = validate(parse_body(orjson.dumps(body), limits), limits, {})
    assert spec.output is not None
    spec.output["folder"] = output_folder(
        spec.output["path"], job_id, "scorer", project=None, jobs_home=root
    )
    store.create_job(
        job_id,
        "scorer",
        spec=orjson.dumps(spec.to_json()).decode(),
        plan=orjson.dumps(worker_plan(api, root, None)).decode(),
        workers=1,
        max_receive_count=spec.max_receive_count,
        visibility_timeout=LEASE_S,
        timeout=None,
    )
    assert store.enqueue(job_id, list(iter_batches(spec, root, limits)))
    assert store.finish_enqueue(job_id)
    return job_id


def test_a_slow_output_write_keeps_the_batch_leased(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'state.db'}")
    job_id = _job(store, tmp_path / "project")
    claim = store.claim_batch(job_id)
    assert claim is not None and claim.batch is not None
    batch = claim.batch
    left, right = socket.socketpair()
    sink = SlowSink(seconds=LEASE_S * 2.5)
    link = QueueLink(store, job_id, {}, left, LEASE_S)
    link.sink = sink  # type: ignore[assignment]  # a stand-in for a remote OutputSink
    writer = threading.Thread(target=link.write_output, args=(batch, b"rows"))
    writer.start()
    stolen = []
    deadline = time.monotonic() + LEASE_S * 2.5
    while writer.is_alive() and time.monotonic() < deadline:
        other = store.claim_batch(job_id)  # another worker, while the write runs
        if other is not None and other.batch is not None and other.batch.idx == batch.idx:
            stolen.append(other.batch.receive_count)
        time.sleep(0.05)
    writer.join()
    left.close()
    right.close()
    assert sink.written == [batch.idx]
    assert stolen == [], "the batch was handed out again while its output was written"
    # The lease is still the writer's: acking it succeeds.
    assert store.ack_batch(job_id, batch, 0.1) is not None
