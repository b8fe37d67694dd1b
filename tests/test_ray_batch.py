"""Batch API jobs whose workers run on a real 2-node Ray cluster, queue in PostgreSQL.

The test is the control plane: it records and enqueues the job in PostgreSQL the
way `JobManager.submit` and `JobRun` do, then `run_job_workers` starts one Ray
actor per worker (SPREAD over the nodes), each running a real sandboxed
`kiln.batch.worker` subprocess and serving its queue link against PostgreSQL
itself; outputs go to a moto S3 server on 127.0.0.1. Killing a worker actor
mid-job, or the whole second node (its raylet and every process it started, as
tests/test_ray_failover.py does), must still give every item exactly once, and
on_job_complete once.

Needs KILN_TEST_POSTGRES_URL (.ci/run starts a throwaway PostgreSQL; where it
cannot, the PostgreSQL tests skip, these included).
"""

from __future__ import annotations

import collections
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from ray_cluster import RayCluster, kill_node  # the session fixture `ray_cluster` is in conftest.py
from storage_servers import BUCKET, S3Server

from kiln.batch import statuses as st
from kiln.batch.sources import iter_batches
from kiln.batch.spec import Limits, output_folder, parse_body, validate
from kiln.batch.workers import worker_plan
from kiln.config import load_project
from kiln.control.store import Store

ray = pytest.importorskip("ray")

PG_URL = os.environ.get("KILN_TEST_POSTGRES_URL")
pytestmark = pytest.mark.skipif(not PG_URL, reason="KILN_TEST_POSTGRES_URL not set")

ITEMS = 2000
BATCH_SIZE = 20
WORKERS = 4

KILN_YAML = """
- kind: BatchAPI
  name: scorer
  predictor: {type: python, path: predictor.py}
  compute: {cpu: 250m}
  jobs: {visibility_timeout: 3, max_workers: 8}
- kind: BatchAPI
  name: broken
  predictor: {type: python, path: broken.py}
  compute: {cpu: 250m}
"""

BROKEN = """
class PythonPredictor:
    def __init__(self, config):
        raise RuntimeError("no weights here")

    def predict(self, payload):
        return payload
"""

PREDICTOR = """
import os, time

class PythonPredictor:
    def __init__(self, config, job_spec):
        self.job_spec = job_spec
        print("env-ray:" + ",".join(sorted(k for k in os.environ if "RAY" in k)), flush=True)

    def predict(self, payload, batch_id):
        time.sleep(0.03)
        print(f"scored batch {batch_id}", flush=True)
        return [x * 2 for x in payload]

    def on_job_complete(self):
        print("on_job_complete " + self.job_spec["job_id"], flush=True)
"""


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    pytest.importorskip("moto")
    server = S3Server(tmp_path_factory.mktemp("s3") / "moto.log")
    yield server
    server.stop()


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "proj"
    root.mkdir()
    (root / "kiln.yaml").write_text(KILN_YAML)
    (root / "predictor.py").write_text(PREDICTOR)
    (root / "broken.py").write_text(BROKEN)
    return root


def _enqueue_job(store: Store, root: Path, body: dict[str, Any], name: str = "scorer") -> str:
    """What JobManager.submit and JobRun's enqueuer do, minus the local workers."""
    job_id = f"ray{os.urandom(4).hex()}"
    api = load_project(root).batch_api(name)
    assert api is not None
    limits = Limits(max_workers=api.jobs.max_workers)
    spec = validate(parse_body(orjson.dumps(body), limits), limits, {})
    assert spec.output is not None
    spec.output["folder"] = output_folder(
        spec.output["path"], job_id, name, project=None, jobs_home=root
    )
    store.create_job(
        job_id,
        name,
        spec=orjson.dumps(spec.to_json()).decode(),
        plan=orjson.dumps(worker_plan(api, root, None)).decode(),
        workers=spec.workers,
        max_receive_count=spec.max_receive_count,
        visibility_timeout=api.jobs.visibility_timeout,
        timeout=None,
    )
    assert store.enqueue(job_id, list(iter_batches(spec, root, limits)))
    assert store.finish_enqueue(job_id)
    return job_id


def _wait_ended(store: Store, job_id: str, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while (job := store.get_job(job_id)) is not None and job.active:
        assert time.monotonic() < deadline, job
        time.sleep(0.2)
    return job


def _parts(s3: S3Server, prefix: str) -> list[str]:
    keys: list[str] = []
    for page in s3.s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return keys


def test_job_spreads_over_both_nodes_and_survives_a_killed_worker(
    ray_cluster: RayCluster,
    s3: S3Server,
    project: Path,
) -> None:
    from kiln.backends.ray.batch import run_job_workers

    assert PG_URL is not None
    root = project
    store = Store(PG_URL)
    body = {
        "workers": WORKERS,
        "item_list": {"items": list(range(ITEMS)), "batch_size": BATCH_SIZE},
        "output": {"path": f"s3://{BUCKET}/out/"},
    }
    job_id = _enqueue_job(store, root, body)
    batches = ITEMS // BATCH_SIZE

    workers = run_job_workers(PG_URL, job_id, str(root), "scorer", WORKERS, env=s3.env())
    try:
        nodes = workers.nodes()
        assert set(nodes) == {ray_cluster.head_node, ray_cluster.second_node}, nodes

        # Mid-job (some batches written, most not), kill one worker's actor outright.
        prefix = f"out/{job_id}/"
        deadline = time.monotonic() + 60
        while len(_parts(s3, prefix)) < batches // 5:
            assert time.monotonic() < deadline, "the workers wrote no output"
            time.sleep(0.1)
        victim = workers.actors[0]
        ray.kill(victim)
        assert len(_parts(s3, prefix)) < batches, "the job ended before the kill"

        job = _wait_ended(store, job_id)
        outcomes = workers.wait(timeout=30)
        logs = [ray.get(a.lines.remote(), timeout=10) for a in workers.actors[1:]]
    finally:
        workers.cancel(grace=1)

    assert job is not None and job.status == st.SUCCEEDED, job
    assert (job.succeeded, job.succeeded_items, job.failed) == (batches, ITEMS, 0)
    assert job.completion == "done"
    assert "error" in outcomes[0]  # the killed actor
    assert [o["exit_code"] for o in outcomes[1:]] == [0] * (WORKERS - 1), outcomes

    # Exactly one output row per item, each item's result, in the shared storage.
    keys = _parts(s3, prefix)
    assert len(keys) == batches
    rows = []
    for key in keys:
        data = s3.s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        rows += [orjson.loads(line) for line in data.splitlines()]
    assert sorted(r["index"] for r in rows) == list(range(ITEMS))
    assert all(r["result"] == r["index"] * 2 for r in rows)

    # Which node ran each batch (the surviving workers' logs): both nodes did.
    ran: dict[str, list[int]] = collections.defaultdict(list)
    lines: list[str] = []
    for mine, node in zip(logs, nodes[1:], strict=True):
        lines += mine
        for line in mine:
            if m := re.fullmatch(r"scored batch (\d+)", line):
                ran[node].append(int(m.group(1)))
    assert set(ran) == {ray_cluster.head_node, ray_cluster.second_node}, ran.keys()
    assert sum(map(len, ran.values())) >= batches // 2
    assert [line for line in lines if line.startswith("on_job_complete")] == [
        f"on_job_complete {job_id}"
    ]
    probes = [line for line in lines if line.startswith("env-ray:")]
    assert probes and set(probes) == {"env-ray:"}, probes  # no RAY_* in any worker's env


def test_a_predictor_that_cannot_load_ends_the_job_in_worker_error(
    ray_cluster: RayCluster,
    s3: S3Server,
    project: Path,
) -> None:
    from kiln.backends.ray.batch import run_job_workers

    assert PG_URL is not None
    store = Store(PG_URL)
    body = {
        "workers": 2,
        "item_list": {"items": list(range(10)), "batch_size": 5},
        "output": {"path": f"s3://{BUCKET}/out/"},
    }
    job_id = _enqueue_job(store, project, body, name="broken")
    workers = run_job_workers(PG_URL, job_id, str(project), "broken", 2, env=s3.env())
    try:
        job = _wait_ended(store, job_id, timeout=45)
        outcomes = workers.wait(timeout=30)
    finally:
        workers.cancel(grace=1)
    assert job.status == st.WORKER_ERROR, job
    assert "no weights here" in (job.error or ""), job.error
    assert {o["exit_code"] for o in outcomes} <= {2, 1}, outcomes  # load failed / job ended


def test_cancel_stops_the_workers_and_leaves_the_job_resumable(
    ray_cluster: RayCluster,
    s3: S3Server,
    project: Path,
) -> None:
    from kiln.backends.ray.batch import run_job_workers

    assert PG_URL is not None
    store = Store(PG_URL)
    body = {
        "workers": 2,
        "item_list": {"items": list(range(400)), "batch_size": 1},
        "output": {"path": f"s3://{BUCKET}/out/"},
    }
    job_id = _enqueue_job(store, project, body)
    workers = run_job_workers(PG_URL, job_id, str(project), "scorer", 2, env=s3.env())
    try:
        deadline = time.monotonic() + 60
        while store.get_job(job_id).succeeded < 3:  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "no batch was acknowledged"
            time.sleep(0.1)
    finally:
        started = time.monotonic()
        workers.cancel(grace=1)
    assert time.monotonic() - started < 15
    for actor in workers.actors:
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(actor.node.remote(), timeout=10)
    time.sleep(0.5)
    job = store.get_job(job_id)
    assert job is not None and job.status == st.RUNNING  # left for a resume, not ended
    settled = job.succeeded
    time.sleep(1.0)
    assert store.get_job(job_id).succeeded == settled  # type: ignore[union-attr]  # nobody runs it
    assert 0 < settled < 400
    store.end_job(job_id, st.STOPPED, error="test over")


NODE_KILL_ITEMS = 10_000
NODE_KILL_BATCH_SIZE = 50  # 200 batches of ~30 ms: a few seconds on 4 workers


def _scored(lines: list[str]) -> list[int]:
    return [int(m.group(1)) for line in lines if (m := re.fullmatch(r"scored batch (\d+)", line))]


@pytest.mark.timeout(240)  # the sum of its bounded waits, were each to run out
def test_a_job_of_10000_items_survives_losing_a_worker_node(
    ray_cluster: RayCluster,
    s3: S3Server,
    project: Path,
) -> None:
    from kiln.backends.ray.batch import run_job_workers

    assert PG_URL is not None
    store = Store(PG_URL)
    body = {
        "workers": WORKERS,
        "item_list": {"items": list(range(NODE_KILL_ITEMS)), "batch_size": NODE_KILL_BATCH_SIZE},
        "output": {"path": f"s3://{BUCKET}/out/"},
    }
    job_id = _enqueue_job(store, project, body)
    batches = NODE_KILL_ITEMS // NODE_KILL_BATCH_SIZE
    head, second = ray_cluster.head_node, ray_cluster.second_node
    dead = ray_cluster.second_node_object()
    raylets = dead.all_processes["raylet"]
    assert len(raylets) == 1
    killed = False

    workers = run_job_workers(PG_URL, job_id, str(project), "scorer", WORKERS, env=s3.env())
    try:
        nodes = workers.nodes()
        assert set(nodes) == {head, second}, nodes

        # Mid-job, once workers on both nodes have scored batches, the second node dies.
        prefix = f"out/{job_id}/"
        deadline = time.monotonic() + 60
        while True:
            lines = ray.get([a.lines.remote() for a in workers.actors], timeout=10)
            before = {n: set() for n in (head, second)}
            for mine, node in zip(lines, nodes, strict=True):
                before[node].update(_scored(mine))
            if all(before.values()) and len(_parts(s3, prefix)) >= batches // 5:
                break
            assert time.monotonic() < deadline, f"batches scored per node: {before}"
            time.sleep(0.1)
        kill_node(raylets[0].process.pid)
        killed = True
        killed_at = time.monotonic()
        assert len(_parts(s3, prefix)) < batches, "the job ended before the kill"

        progress = []  # (s after the kill, batches done): shown if the job stalls
        while (job := store.get_job(job_id)) is not None and job.active:
            progress.append((round(time.monotonic() - killed_at, 1), job.succeeded))
            assert time.monotonic() < killed_at + 90, progress
            time.sleep(0.5)
        ended_s = time.monotonic() - killed_at
        outcomes = workers.wait(timeout=30)
        logs = ray.get([a.lines.remote() for a in workers.actors], timeout=10)
    finally:
        workers.cancel(grace=1)
        if killed:
            replacing = time.monotonic()
            ray_cluster.replace_second_node(dead)
            print(f"second node replaced in {time.monotonic() - replacing:.1f}s")

    assert job is not None and job.status == st.SUCCEEDED, job
    assert (job.succeeded, job.succeeded_items, job.failed) == (batches, NODE_KILL_ITEMS, 0)
    assert job.completion == "done"
    assert store.dead_letters(job_id) == []
    # Every worker finished cleanly; those of the lost node were restarted on the head.
    assert [o.get("exit_code") for o in outcomes] == [0] * WORKERS, outcomes
    for outcome, node in zip(outcomes, nodes, strict=True):
        assert outcome["reconstructed"] == (node == second), (outcomes, nodes)
        assert outcome["node_id"] == head, (outcomes, nodes)

    # Exactly one output row per item, each item's result: none lost, none twice.
    keys = _parts(s3, prefix)
    assert len(keys) == batches
    rows = []
    for key in keys:
        data = s3.s3.get_object(Bucket=BUCKET, Key=key)["Body"].read()
        rows += [orjson.loads(line) for line in data.splitlines()]
    assert len(rows) == NODE_KILL_ITEMS
    assert sorted(r["index"] for r in rows) == list(range(NODE_KILL_ITEMS))
    assert all(r["result"] == r["index"] * 2 for r in rows)

    # on_job_complete ran once, in one of the workers alive at the end.
    done = [line for mine in logs for line in mine if line.startswith("on_job_complete")]
    assert done == [f"on_job_complete {job_id}"], done
    print(
        f"node kill: {NODE_KILL_ITEMS} items in {batches} batches, scored before the kill: "
        f"head {len(before[head])}, second {len(before[second])}; "
        f"job ended {ended_s:.1f}s after the kill"
    )
