"""Batch API throughput: jobs through `kiln serve` against the same predictor in a plain loop.

Three jobs, each against its limit (the same code called in a loop in one process,
on the same items in the same batches, with no queue, no store and no processes):

1. ``trivial``: N small JSON-lines items (default 1,000,000, from ``delimited_files``)
   through a predictor that returns its payload, ``batch_size`` 1000, 2 workers.
   Also reports how fast enqueuing ran and the server's peak memory (enqueuing
   streams: the items are never all in memory).
2. ``overhead``: 20,000 one-item batches through a no-op predictor with 1 worker:
   the job's time per batch is Kiln's per-batch overhead (claim + acknowledge in
   the store, payload decode, bookkeeping). Target: under 2 ms.
3. ``onnx``: iris samples through examples/iris-onnx (its model and request handler,
   no predictor) with ``batch_size`` 256 and 2 workers, results to a jsonl output.
   Target: at least 80% of the limit.

Run: .venv/bin/python bench/batch_jobs.py [--items 1000000] [--onnx-items 200000]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import orjson

ROOT = Path(__file__).parents[1]
IRIS = ROOT / "examples" / "iris-onnx"

PREDICTOR = """
class PythonPredictor:
    def __init__(self, config, job_spec):
        self.config = config

    def predict(self, payload, batch_id):
        return payload
"""

CONFIG = f"""\
- kind: BatchAPI
  name: trivial
  predictor: {{type: python, path: predictor.py}}
  jobs: {{max_batch_bytes: 4Mi}}
- kind: BatchAPI
  name: iris-batch
  onnx: {{model: {IRIS / "model" / "iris.onnx"}, request_handler: {IRIS / "handler.py"}}}
  metadata: {{labels: [setosa, versicolor, virginica]}}
"""


def write_items(path: Path, n: int) -> None:
    with path.open("wb") as f:
        for start in range(0, n, 100_000):
            f.write(b"".join(b'{"x":%d}\n' % i for i in range(start, min(start + 100_000, n))))


def write_iris(path: Path, n: int) -> None:
    rows = [
        {"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2},
        {"sepal_length": 6.7, "sepal_width": 3.0, "petal_length": 5.2, "petal_width": 2.3},
        {"sepal_length": 5.9, "sepal_width": 3.0, "petal_length": 4.2, "petal_width": 1.5},
    ]
    encoded = [orjson.dumps(r) + b"\n" for r in rows]
    with path.open("wb") as f:
        f.write(b"".join(encoded[i % 3] for i in range(n)))


def batches_of(path: Path, size: int) -> list[list[Any]]:
    items = [orjson.loads(line) for line in path.read_bytes().splitlines() if line]
    return [items[i : i + size] for i in range(0, len(items), size)]


def loop_trivial(path: Path, size: int) -> float:
    """items/s of the predictor in a plain loop, JSON decoding included (as workers do)."""
    sys.path.insert(0, str(path.parent))
    from predictor import PythonPredictor  # type: ignore[import-not-found]

    predictor = PythonPredictor({}, {})
    started = time.perf_counter()
    count = 0
    batch: list[Any] = []
    with path.open("rb") as f:
        for line in f:
            batch.append(orjson.loads(line))
            if len(batch) == size:
                count += len(predictor.predict(batch, "0"))
                batch = []
    if batch:
        count += len(predictor.predict(batch, "0"))
    return count / (time.perf_counter() - started)


def loop_onnx(path: Path, size: int) -> float:
    """items/s of the iris pipeline (pre_inference, model, post_inference) in a plain loop."""
    from kiln.config import load_project
    from kiln.handlers.context import RequestContext
    from kiln.handlers.pipeline import build_pipeline
    from kiln.serving.encoding import dumps
    from kiln.serving.types import WorkerSpec

    project = load_project(path.parent)
    api = project.batch_api("iris-batch")
    assert api is not None
    block = api.runtime_block
    spec = WorkerSpec(
        api="iris-batch",
        version=None,
        runtime="onnx",
        model_path=block.model,
        request_handler=block.request_handler,
        metadata=dict(api.metadata),
        max_batch_size=size,
    )
    pipeline = build_pipeline(spec)
    batches = batches_of(path, size)
    started = time.perf_counter()
    count = 0
    for batch in batches:
        contexts = [RequestContext(request_id="", api="iris-batch") for _ in batch]
        results = pipeline.predict_batch(batch, contexts, [None] * len(batch))
        dumps(results)  # the job writes its results too
        count += len(results)
    return count / (time.perf_counter() - started)


class Server:
    def __init__(self, project: Path, home: Path) -> None:
        self.home = home
        env = {**os.environ, "KILN_HOME": str(home)}
        self.out = (home / "serve.out").open("wb") if home.mkdir(parents=True) is None else None
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kiln.cli.main", "serve", str(project), "--port", "0"]
            + ["--management-port", "0", "--metrics-port", "0", "--grpc-port", "0"]
            + ["--home", str(home / "s")],
            stdout=self.out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        info = home / "s" / "server.json"
        deadline = time.monotonic() + 60
        while not info.exists():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError((home / "serve.out").read_text())
            time.sleep(0.05)
        time.sleep(0.1)
        self.url = orjson.loads(info.read_bytes())["url"]
        self.client = httpx.Client(base_url=self.url, timeout=60)

    def peak_rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def run_job(self, api: str, spec: dict[str, Any]) -> dict[str, Any]:
        started = time.perf_counter()
        response = self.client.post(f"/{api}", content=orjson.dumps(spec))
        response.raise_for_status()
        job_id = response.json()["job_id"]
        enqueued_at = None
        while True:
            status = self.client.get(f"/{api}", params={"jobID": job_id}).json()
            state = status["job_status"]["status"]
            if enqueued_at is None and state != "status_enqueuing":
                enqueued_at = time.perf_counter()
            if state not in ("status_enqueuing", "status_running"):
                break
            time.sleep(0.05)
        ended = time.perf_counter()
        assert state == "status_succeeded", status
        job = status["job_status"]
        return {
            "wall_s": ended - started,
            "enqueue_s": (enqueued_at or ended) - started,
            "run_s": _span(job["start_time"], job["end_time"]),
            "items": status["progress"]["items_done"],
            "batches": job["total_batch_count"],
            "avg_batch_s": status["metrics"]["avg_time_per_batch"],
        }

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)


def _span(start: str, end: str) -> float:
    from datetime import datetime

    def parse(s: str) -> float:
        whole, frac = s.rstrip("Z").split(".")
        return datetime.fromisoformat(whole + "+00:00").timestamp() + int(frac) / 1e9

    return parse(end) - parse(start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--onnx-items", type=int, default=200_000)
    parser.add_argument("--overhead-batches", type=int, default=20_000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kiln-batch-bench-"))
    project = work / "proj"
    project.mkdir()
    (project / "predictor.py").write_text(PREDICTOR)
    (project / "kiln.yaml").write_text(CONFIG)
    write_items(project / "items.jsonl", args.items)
    write_items(project / "small.jsonl", args.overhead_batches)
    write_iris(project / "iris.jsonl", args.onnx_items)
    rows = []
    server = Server(project, work / "home")
    try:
        trivial = server.run_job(
            "trivial",
            {"workers": 2, "delimited_files": {"paths": ["items.jsonl"], "batch_size": 1000}},
        )
        peak = server.peak_rss_mib()
        limit = loop_trivial(project / "items.jsonl", 1000)
        rows.append(("trivial, 2 workers, batch 1000", trivial, limit))
        overhead = server.run_job(
            "trivial",
            {"workers": 1, "delimited_files": {"paths": ["small.jsonl"], "batch_size": 1}},
        )
        rows.append(("overhead: no-op, 1 worker, batch 1", overhead, None))
        onnx = server.run_job(
            "iris-batch",
            {
                "workers": 2,
                "delimited_files": {"paths": ["iris.jsonl"], "batch_size": 256},
                "output": {"path": "out"},  # kiln serve: <project>/out/<job_id>/
            },
        )
        onnx_limit = loop_onnx(project / "iris.jsonl", 256)
        rows.append(("iris-onnx, 2 workers, batch 256", onnx, onnx_limit))
    finally:
        server.stop()
    print(
        f"\n{'job':<36} {'items':>9} {'batches':>8} {'enqueue s':>9} {'run s':>7} "
        f"{'items/s':>10} {'limit/s':>10} {'of limit':>8} {'ms/batch':>8}"
    )
    for name, r, lim in rows:
        rate = r["items"] / r["run_s"]
        per_batch = 1000 * r["run_s"] / r["batches"]
        print(
            f"{name:<36} {r['items']:>9} {r['batches']:>8} {r['enqueue_s']:>9.2f} "
            f"{r['run_s']:>7.2f} {rate:>10,.0f} {lim or 0:>10,.0f} "
            f"{(100 * rate / lim if lim else 0):>7.0f}% {per_batch:>8.3f}"
        )
    print(f"\nserver peak RSS while enqueuing {args.items:,} items: {peak:.0f} MiB")
    print(f"enqueue rate: {trivial['items'] / trivial['enqueue_s']:,.0f} items/s")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
