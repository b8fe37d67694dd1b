"""Batch API throughput on Ray: one job's workers on 1 node vs 2 nodes, and the local limit.

One job (N items in an ``item_list``, ``batch_size`` B, every item's result written to
a jsonl output folder) through a predictor that sleeps ``--predict-ms`` per batch (a
model call that leaves the CPU free) and doubles each item, run four ways in one run:

  local 1x   `kiln serve DIR` (the local backend, its SQLite store), W workers
  ray 1 node a 1-node `ray.cluster_utils.Cluster` (this script's own processes),
             W workers (`kiln.backends.ray.batch.run_job_workers`, queue in PostgreSQL)
  local 2x   `kiln serve DIR`, 2W workers
  ray 2 nodes the same cluster once a second node has joined, 2W workers (SPREAD)

with W = ``--workers-per-node``. The local rows are the limit each Ray row is measured
against: the same job and worker count with no Ray (and `kiln serve`'s SQLite store
instead of PostgreSQL). Seconds are the job's own (``started_at`` -> ``ended_at`` in
its store: enqueued to last batch and on_job_complete), so they include starting the
workers but not enqueuing; "steady items/s" is the rate between 10% and 90% of the
items done (sampled every 50 ms), the workers' start-up left out. Both Ray nodes share
this machine's cores (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps them on 127.0.0.1), so
"2 nodes" measures the placement and the queue, not more hardware. Ray workers run
with ``sandbox: off``, as `kiln serve` runs them.

PostgreSQL: ``--store postgresql+psycopg://...`` (an empty, wipeable database), else a
throwaway one from scripts/postgres-for-tests.sh, stopped and removed at the end.
Writes bench/results/ray_batch-<ts>.json.

Run: .venv/bin/python bench/ray_batch.py [--items 20000] [--batch-size 100]
     [--predict-ms 20] [--workers-per-node 2] [--store URL]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

# Read when Ray is imported: every node stays on 127.0.0.1 (see tests/ray_cluster.py).
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

HERE = Path(__file__).parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import batch_jobs  # noqa: E402

KILN_YAML = """\
- kind: BatchAPI
  name: scorer
  predictor: {type: python, path: predictor.py}
  compute: {cpu: 250m}
  jobs: {max_workers: 64}
"""

PREDICTOR = """
import time

class PythonPredictor:
    def __init__(self, config, job_spec):
        self.pause = float(config.get("predict_ms", 0)) / 1000

    def predict(self, payload, batch_id):
        time.sleep(self.pause)
        return [x * 2 for x in payload]
"""

NODE_START_S = 60.0
JOB_TIMEOUT_S = 900.0
POLL_S = 0.05


def sample(progress: Any, what: str) -> list[tuple[float, int]]:
    """Poll `progress()` -> (still active, items done) until the job ends; (time, items)."""
    samples: list[tuple[float, int]] = []
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        active, done = progress()
        samples.append((time.monotonic(), done))
        if not active:
            return samples
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} still running after {JOB_TIMEOUT_S:g}s")
        time.sleep(POLL_S)


def steady_rate(samples: list[tuple[float, int]], items: int) -> float | None:
    """Items/s between the first samples at >= 10% and >= 90% of the items done."""
    low = next((s for s in samples if s[1] >= 0.1 * items), None)
    high = next((s for s in samples if s[1] >= 0.9 * items), None)
    if low is None or high is None or high[0] <= low[0]:
        return None  # too short to sample: raise --items
    return (high[1] - low[1]) / (high[0] - low[0])


def job_body(args: argparse.Namespace, workers: int) -> dict[str, Any]:
    return {
        "workers": workers,
        "item_list": {"items": list(range(args.items)), "batch_size": args.batch_size},
        "config": {"predict_ms": args.predict_ms},
        "output": {"path": "out"},
    }


# ---- PostgreSQL ---------------------------------------------------------------------


class ThrowawayPostgres:
    """scripts/postgres-for-tests.sh's PostgreSQL, stopped (by its pid) and removed by `stop`."""

    def __init__(self) -> None:
        script = ROOT / "scripts" / "postgres-for-tests.sh"
        self.url = subprocess.run(
            [str(script)], capture_output=True, text=True, timeout=120, check=False
        ).stdout.strip()
        if not self.url:
            raise SystemExit("could not start a throwaway PostgreSQL; pass --store URL")
        port = self.url.rsplit(":", 1)[1].split("/", 1)[0]
        self.pid, self.data = 0, ""
        for pidfile in Path("/tmp").glob("kiln-pg.*/postmaster.pid"):
            lines = pidfile.read_text().splitlines()
            if len(lines) > 3 and lines[3].strip() == port:
                self.pid, self.data = int(lines[0]), str(pidfile.parent)

    def stop(self) -> None:
        if not self.pid:
            return
        os.kill(self.pid, signal.SIGINT)  # PostgreSQL's fast shutdown
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        shutil.rmtree(self.data, ignore_errors=True)


# ---- local ----------------------------------------------------------------------------


def run_local(project: Path, home: Path, args: argparse.Namespace, workers: int) -> dict:
    """The job through `kiln serve` (bench/batch_jobs.py's server), its progress sampled."""
    import orjson

    server = batch_jobs.Server(project, home)
    try:
        response = server.client.post("/scorer", content=orjson.dumps(job_body(args, workers)))
        response.raise_for_status()
        job_id = response.json()["job_id"]
        last: dict[str, Any] = {}

        def progress() -> tuple[bool, int]:
            last.update(server.client.get("/scorer", params={"jobID": job_id}).json())
            state = last["job_status"]["status"]
            return state in ("status_enqueuing", "status_running"), last["progress"]["items_done"]

        samples = sample(progress, f"local job {job_id}")
    finally:
        server.stop()
    job = last["job_status"]
    if job["status"] != "status_succeeded" or last["progress"]["items_done"] != args.items:
        raise RuntimeError(f"the local job did not succeed: {last}")
    return {
        "seconds": batch_jobs._span(job["start_time"], job["end_time"]),
        "steady": steady_rate(samples, args.items),
        "items": last["progress"]["items_done"],
        "nodes": 1,
    }


# ---- Ray ------------------------------------------------------------------------------


class RayCluster:
    """A head node on 127.0.0.1; `add_node` brings the second one."""

    def __init__(self, cpus: int) -> None:
        import ray
        from ray.cluster_utils import Cluster

        self.cpus = cpus
        self.cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": cpus,
                "node_ip_address": "127.0.0.1",
                "include_dashboard": False,
            },
        )
        try:
            self.cluster.wait_for_nodes(timeout=NODE_START_S)
            ray.init(address=self.cluster.address, log_to_driver=False)
        except BaseException:
            self.cluster.shutdown()
            raise

    def add_node(self) -> None:
        import ray

        self.cluster.add_node(num_cpus=self.cpus, node_ip_address="127.0.0.1")
        self.cluster.wait_for_nodes(timeout=NODE_START_S)
        deadline = time.monotonic() + NODE_START_S
        while sum(1 for n in ray.nodes() if n["Alive"]) < 2:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the second node did not join within {NODE_START_S:g}s")
            time.sleep(0.2)

    def stop(self) -> None:
        import ray

        try:
            ray.shutdown()
        finally:
            self.cluster.shutdown()  # the processes it started, never `ray stop`


def enqueue(store: Any, project: Path, body: dict[str, Any]) -> str:
    """What JobManager.submit and JobRun's enqueuer do, minus the local workers."""
    import orjson

    from kiln.batch.sources import iter_batches
    from kiln.batch.spec import Limits, output_folder, parse_body, validate
    from kiln.batch.workers import worker_plan
    from kiln.config import load_project

    job_id = f"bench{os.urandom(4).hex()}"
    api = load_project(project).batch_api("scorer")
    assert api is not None
    limits = Limits(max_workers=api.jobs.max_workers)
    spec = validate(parse_body(orjson.dumps(body), limits), limits, {})
    assert spec.output is not None
    spec.output["folder"] = output_folder(
        spec.output["path"], job_id, "scorer", project=None, jobs_home=project
    )
    store.create_job(
        job_id,
        "scorer",
        spec=orjson.dumps(spec.to_json()).decode(),
        plan=orjson.dumps(worker_plan(api, project, None)).decode(),
        workers=spec.workers,
        max_receive_count=spec.max_receive_count,
        visibility_timeout=api.jobs.visibility_timeout,
        timeout=None,
    )
    store.enqueue(job_id, list(iter_batches(spec, project, limits)))
    store.finish_enqueue(job_id)
    return job_id


def run_ray(store_url: str, project: Path, args: argparse.Namespace, workers: int) -> dict:
    from kiln.backends.ray.batch import run_job_workers
    from kiln.control.store import Store

    store = Store(store_url)
    job_id = enqueue(store, project, job_body(args, workers))
    handles = run_job_workers(store_url, job_id, str(project), "scorer", workers, sandbox="off")
    try:

        def progress() -> tuple[bool, int]:
            job = store.get_job(job_id)
            return job is not None and job.active, job.succeeded_items if job else 0

        samples = sample(progress, f"Ray job {job_id}")
        job = store.get_job(job_id)
        nodes = handles.nodes(timeout=60)
        outcomes = handles.wait(timeout=60)
    finally:
        handles.cancel(grace=1)
    if job is None or job.status != "succeeded" or job.succeeded_items != args.items:
        raise RuntimeError(f"the Ray job did not succeed: {job}; workers: {outcomes}")
    assert job.started_at is not None and job.ended_at is not None
    return {
        "seconds": job.ended_at - job.started_at,
        "steady": steady_rate(samples, args.items),
        "items": job.succeeded_items,
        "nodes": len(set(nodes)),
    }


# ---- the run ----------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="kiln-ray-batch-bench-"))
    project = work / "proj"
    project.mkdir()
    (project / "kiln.yaml").write_text(KILN_YAML)
    (project / "predictor.py").write_text(PREDICTOR)
    postgres = None if args.store else ThrowawayPostgres()
    store_url = args.store or postgres.url  # type: ignore[union-attr]
    w = args.workers_per_node
    rows: list[dict[str, Any]] = []
    try:
        rows.append({"backend": "local", **run_local(project, work / "h1", args, w), "workers": w})
        cluster = RayCluster(args.cpus_per_node)
        try:
            rows.append({"backend": "ray", **run_ray(store_url, project, args, w), "workers": w})
            cluster.add_node()
            rows.append(
                {"backend": "ray", **run_ray(store_url, project, args, 2 * w), "workers": 2 * w}
            )
        finally:
            cluster.stop()
        local2 = run_local(project, work / "h2", args, 2 * w)
        rows.insert(2, {"backend": "local", **local2, "workers": 2 * w})
    finally:
        if postgres is not None:
            postgres.stop()
        shutil.rmtree(work, ignore_errors=True)
    for row in rows:
        row["items_per_s"] = row["items"] / row["seconds"]
    return {
        "when": datetime.now().isoformat(timespec="seconds"),
        "items": args.items,
        "batch_size": args.batch_size,
        "predict_ms": args.predict_ms,
        "cpus": os.cpu_count(),
        "rows": rows,
    }


def print_report(result: dict[str, Any]) -> None:
    print(
        f"\n{result['items']} items, batch_size {result['batch_size']}, "
        f"predict {result['predict_ms']} ms per batch, {result['cpus']} cores on this machine"
    )
    print(
        f"{'backend':<8} {'nodes':>5} {'workers':>7} {'items':>8} {'seconds':>8} "
        f"{'items/s':>9} {'steady items/s':>14}  of local (items/s, steady)"
    )
    local: dict[str, Any] = {}
    for row in result["rows"]:
        steady = row["steady"]
        share = ""
        if row["backend"] == "local":
            local = row
        elif local:
            share = f"{100 * row['items_per_s'] / local['items_per_s']:.0f}%"
            if steady and local["steady"]:
                share += f", {100 * steady / local['steady']:.0f}%"
        print(
            f"{row['backend']:<8} {row['nodes']:>5} {row['workers']:>7} {row['items']:>8} "
            f"{row['seconds']:>8.2f} {row['items_per_s']:>9,.0f} "
            f"{(f'{steady:,.0f}' if steady else '-'):>14}  {share}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--predict-ms", type=float, default=20.0)
    parser.add_argument("--workers-per-node", type=int, default=2)
    parser.add_argument("--cpus-per-node", type=int, default=2)
    parser.add_argument("--store", help="PostgreSQL URL (default: a throwaway one)")
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args()
    result = run(args)
    print_report(result)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"ray_batch-{datetime.now():%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
