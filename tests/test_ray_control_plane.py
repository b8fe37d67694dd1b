"""`kiln server --backend ray`: Kiln's control plane placing APIs on a real 2-node Ray cluster.

The CLI as a user runs it (`kiln server start --backend ray --ray-address ...
--store postgresql://...`, `kiln deploy`, `kiln get`, `rollback`, `refresh`,
`delete`), requests through Ray Serve's HTTP proxy (the cluster's ingress) with
API keys from the control plane's PostgreSQL store, rolling updates under 8
clients with no failed request, and the data plane surviving a control-plane
restart without restarting a replica.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import kiln_on_ray
import orjson
import pytest
from daemon import Daemon
from ray_cluster import RayCluster
from storage_servers import BUCKET, S3Server
from support import write

serve = pytest.importorskip("ray.serve")

CLIENTS = 8

HANDLER = """
VERSION = "{version}"


class Handler:
    def load(self, model_dir, config):
        if VERSION == "broken":
            raise RuntimeError("this revision cannot load its model")

    def predict(self, payload, context):
        return {{"version": VERSION, "echo": payload}}
"""

CONFIG = """
- kind: deployment
  name: shop
- kind: api
  name: echo
  python: {handler: handler.py:Handler}
  compute: {min_replicas: 2, max_replicas: 2, cpu: 100m}
"""


def project(folder: Path, version: str) -> Path:
    write(folder / "handler.py", HANDLER.format(version=version))
    write(folder / "kiln.yaml", CONFIG)
    return folder


def kiln_apps() -> dict[str, Any]:
    """Serve's applications that Kiln's control plane runs (ingress and API revisions)."""
    return {
        name: app
        for name, app in serve.status().applications.items()
        if name == "kiln-ingress" or name.startswith("echo-")
    }


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    pytest.importorskip("moto")
    server = S3Server(tmp_path_factory.mktemp("s3") / "moto.log")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def daemon(
    ray_cluster: RayCluster, s3: S3Server, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Daemon]:
    home = tmp_path_factory.mktemp("ray-control") / "home"
    # Job outputs on Ray go to shared storage, written with the server's credentials.
    d = kiln_on_ray.start(ray_cluster, home, s3.env())
    yield d
    d.stop()
    kiln_on_ray.remove_kiln_apps()  # the data plane outlives its control plane by design


def deploy(d: Daemon, folder: Path, env: dict[str, str] | None = None) -> str:
    done = d.kiln_env(env or d.env, "deploy", str(folder), timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def call(d: Daemon, path: str, body: Any, key: str | None = None) -> httpx.Response:
    headers = {"x-api-key": key or d.admin_key}
    return httpx.post(f"{d.proxy}{path}", json=body, headers=headers, timeout=60)  # type: ignore[attr-defined]


def test_deploy_serves_through_the_serve_proxy_on_both_nodes(
    daemon: Daemon, ray_cluster: RayCluster, tmp_path: Path
) -> None:
    out = deploy(daemon, project(tmp_path / "shop", "v1"))
    assert "is live" in out
    endpoint = daemon.apis()["echo"]["endpoint"]

    # Through Ray Serve's proxy (the cluster's ingress), with the control plane's keys.
    answer = daemon.wait_until(lambda: call(daemon, endpoint, 7).json(), 30, "the proxy route")
    assert answer == {"version": "v1", "echo": 7}
    assert httpx.post(f"{ray_cluster.url}{endpoint}", json=1).status_code == 401
    # And through the control plane's own inference port, on the same replicas.
    mine = daemon.http.post(f"{daemon.url}{endpoint}", json=8)
    assert mine.status_code == 200 and mine.json() == {"version": "v1", "echo": 8}
    assert mine.headers["x-kiln-node"] in (ray_cluster.head_node, ray_cluster.second_node)

    # `kiln get` shows Serve's replicas with their nodes; 2 replicas spread over 2 nodes.
    echo = daemon.wait_until(
        lambda: (e := daemon.apis()["echo"])["replicas"]["ready"] == 2 and e, 30, "2 replicas"
    )
    assert echo["status"] == "live"
    nodes = {r["node"] for r in echo["replicas"]["on_nodes"]}
    assert nodes <= {ray_cluster.head_node, ray_cluster.second_node} and len(nodes) >= 1
    answered = Counter(call(daemon, endpoint, i).headers.get("x-kiln-node") for i in range(40))
    assert set(answered) == nodes, answered
    echo_apps = [name for name in kiln_apps() if name.startswith("echo-")]
    assert len(echo_apps) == 1 and echo_apps[0].startswith(f"echo-{echo['revision']}")


def _load(daemon: Daemon, endpoint: str, stop: threading.Event) -> tuple[Counter[Any], list[str]]:
    seen: Counter[Any] = Counter()
    failures: list[str] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        with httpx.Client(base_url=daemon.proxy, timeout=60) as http:  # type: ignore[attr-defined]
            n = 0
            while not stop.is_set() and n < 5000:
                n += 1
                r = http.post(endpoint, json=i, headers={"x-api-key": daemon.admin_key})
                with lock:
                    if r.status_code == 200:
                        seen[r.json()["version"]] += 1
                    else:
                        failures.append(f"{r.status_code} {r.text[:200]}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    _load.threads = threads  # type: ignore[attr-defined]
    return seen, failures


def _stop_load(stop: threading.Event) -> None:
    stop.set()
    for thread in _load.threads:  # type: ignore[attr-defined]
        thread.join(60)


def test_rolling_update_rollback_and_refresh_fail_no_request(
    daemon: Daemon, tmp_path: Path
) -> None:
    folder = project(tmp_path / "shop", "v1")
    deploy(daemon, folder)
    endpoint = daemon.apis()["echo"]["endpoint"]
    first = daemon.apis()["echo"]["revision"]
    stop = threading.Event()
    seen, failures = _load(daemon, endpoint, stop)
    try:
        time.sleep(1)
        deploy(daemon, project(folder, "v2"))  # a new revision: blue/green applications
        daemon.wait_until(lambda: seen["v2"] > 20, 30, "v2 answering")
        rolled = daemon.kiln("rollback", "echo", first, timeout=300)
        assert rolled.returncode == 0, rolled.stdout + rolled.stderr
        mark = seen["v1"]
        daemon.wait_until(lambda: seen["v1"] > mark + 20, 30, "v1 answering again")
        refreshed = daemon.kiln("refresh", "echo", timeout=300)
        assert refreshed.returncode == 0, refreshed.stdout + refreshed.stderr
        time.sleep(4)  # the refreshed application's old one drains and goes
    finally:
        _stop_load(stop)
    assert failures == [], failures[:5]
    assert seen["v1"] > 0 and seen["v2"] > 0
    # Only the live revision's application is left (the ingress and one echo application).
    daemon.wait_until(lambda: len(kiln_apps()) == 2, 30, "old applications deleted")
    assert call(daemon, endpoint, 1).json()["version"] == "v1"


def test_a_broken_revision_leaves_the_old_one_serving(daemon: Daemon, tmp_path: Path) -> None:
    folder = project(tmp_path / "shop", "v1")
    deploy(daemon, folder)
    endpoint = daemon.apis()["echo"]["endpoint"]
    done = daemon.kiln("deploy", str(project(folder, "broken")), timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "cannot load its model" in done.stderr and "keeps serving" in done.stderr
    assert call(daemon, endpoint, 1).json()["version"] == "v1"
    daemon.wait_until(lambda: len(kiln_apps()) == 2, 60, "the broken application removed")


def test_users_keys_and_delete_through_the_proxy(daemon: Daemon, tmp_path: Path) -> None:
    made = daemon.kiln("users", "create", "alice", "-o", "json")
    assert made.returncode == 0, made.stderr
    alice = orjson.loads(made.stdout)["key"]
    other = orjson.loads(daemon.kiln("users", "create", "bob", "-o", "json").stdout)["key"]
    folder = tmp_path / "mine"
    write(folder / "handler.py", HANDLER.format(version="alice"))
    write(folder / "kiln.yaml", CONFIG.replace("name: shop", "name: mine"))
    deploy(daemon, folder, {**daemon.env, "KILN_API_KEY": alice})
    path = "/alice/echo"
    answer = daemon.wait_until(lambda: call(daemon, path, 3, alice).json(), 30, "alice's API")
    assert answer == {"version": "alice", "echo": 3}
    assert call(daemon, path, 3, other).status_code == 404  # another user's API: not there
    assert httpx.post(f"{daemon.proxy}{path}", json=3).status_code == 401  # type: ignore[attr-defined]

    gone = daemon.kiln_env({**daemon.env, "KILN_API_KEY": alice}, "delete", "echo", "-f")
    assert gone.returncode == 0, gone.stdout + gone.stderr
    daemon.wait_until(lambda: call(daemon, path, 3, alice).status_code == 404, 30, "404")
    daemon.wait_until(
        lambda: not any(n.startswith("alice.echo-") for n in serve.status().applications),
        30,
        "alice's application deleted",
    )


def test_the_data_plane_outlives_a_control_plane_restart(daemon: Daemon, tmp_path: Path) -> None:
    deploy(daemon, project(tmp_path / "shop", "v1"))
    endpoint = daemon.apis()["echo"]["endpoint"]
    before = {
        r["replica"]
        for r in daemon.wait_until(lambda: daemon.apis()["echo"]["replicas"]["on_nodes"], 30)
    }
    daemon.stop()
    assert call(daemon, endpoint, 5).json() == {"version": "v1", "echo": 5}  # no control plane
    daemon.start(*daemon.ray_flags)  # type: ignore[attr-defined]
    echo = daemon.wait_until(
        lambda: (e := daemon.apis()["echo"])["status"] == "live" and e, 60, "restored"
    )
    after = {r["replica"] for r in echo["replicas"]["on_nodes"]}
    assert after == before  # restored onto the same Serve application: nothing restarted
    assert call(daemon, endpoint, 6).json() == {"version": "v1", "echo": 6}


BATCH_CONFIG = """
- kind: deployment
  name: scoring
- kind: BatchAPI
  name: scorer
  predictor: {type: python, path: predictor.py}
  compute: {cpu: 250m}
"""

PREDICTOR = """
class PythonPredictor:
    def __init__(self, config, job_spec):
        pass

    def predict(self, payload, batch_id):
        print(f"scored batch {batch_id}", flush=True)
        return [x * 2 for x in payload]
"""


def test_a_batch_job_runs_its_workers_on_the_cluster(
    daemon: Daemon, ray_cluster: RayCluster, s3: S3Server, tmp_path: Path
) -> None:
    folder = tmp_path / "scoring"
    write(folder / "kiln.yaml", BATCH_CONFIG)
    write(folder / "predictor.py", PREDICTOR)
    deploy(daemon, folder)
    spec = write(
        tmp_path / "job.json",
        orjson.dumps(
            {
                "workers": 2,
                "item_list": {"items": list(range(400)), "batch_size": 20},
                "output": {"path": f"s3://{BUCKET}/ray-jobs/"},
            }
        ).decode(),
    )
    submitted = daemon.kiln("jobs", "submit", "scorer", str(spec))
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    job_id = submitted.stdout.strip().splitlines()[-1]
    watched = daemon.kiln("jobs", "get", "scorer", job_id, "-w", timeout=240)
    logs = daemon.kiln("logs", "scorer", job_id)
    assert watched.returncode == 0 and "worker error" not in watched.stdout, logs.stdout
    listed = s3.s3.list_objects_v2(Bucket=BUCKET, Prefix=f"ray-jobs/{job_id}/")
    rows = [
        orjson.loads(line)
        for item in listed.get("Contents", [])
        for line in s3.s3.get_object(Bucket=BUCKET, Key=item["Key"])["Body"].read().splitlines()
    ]
    everything = [o["Key"] for o in s3.s3.list_objects_v2(Bucket=BUCKET).get("Contents", [])]
    assert sorted(r["index"] for r in rows) == list(range(400)), (everything[:5], watched.stdout)
    assert all(r["result"] == r["index"] * 2 for r in rows)
    # The workers ran as Ray actors (on the cluster's nodes), not under the control plane.
    logs = daemon.kiln("logs", "scorer", job_id)
    assert logs.returncode == 0, logs.stderr
    assert "worker(s) running on ray node(s)" in logs.stdout
    nodes = {ray_cluster.head_node, ray_cluster.second_node}
    assert any(node in logs.stdout for node in nodes)
    assert "scored batch 0" in logs.stdout  # the workers' own output, in the job log
    children = [Path(f"/proc/{pid}/cmdline") for pid in daemon.worker_pids()]
    assert not any(b"kiln.batch.worker" in p.read_bytes() for p in children if p.exists())

    local = tmp_path / "local-job.json"
    write(
        local,
        orjson.dumps(
            {"workers": 1, "item_list": {"items": [1], "batch_size": 1}, "output": {"path": "r/"}}
        ).decode(),
    )
    refused = daemon.kiln("jobs", "submit", "scorer", str(local))
    assert refused.returncode == 0, refused.stdout + refused.stderr
    job = refused.stdout.strip().splitlines()[-1]
    ended = daemon.kiln("jobs", "get", "scorer", job, "-w", timeout=60)
    assert "must be shared storage" in ended.stdout + ended.stderr


LOGGING_HANDLER = """
class Handler:
    def predict(self, payload, context):
        print(f"handled token-{payload}", flush=True)
        return {"token": payload}
"""


def test_kiln_logs_merges_the_replicas_logs_from_the_cluster(
    daemon: Daemon, ray_cluster: RayCluster, tmp_path: Path
) -> None:
    folder = tmp_path / "talk"
    write(folder / "handler.py", LOGGING_HANDLER)
    write(
        folder / "kiln.yaml",
        CONFIG.replace("name: shop", "name: talk").replace("name: echo", "name: talker"),
    )
    deploy(daemon, folder)
    endpoint = daemon.apis()["talker"]["endpoint"]
    tokens = [f"t{i:03d}" for i in range(30)]
    answered = {call(daemon, endpoint, token).headers.get("x-kiln-node") for token in tokens}

    def merged() -> list[dict[str, Any]]:
        done = daemon.kiln("logs", "talker", "--tail", "1000")
        assert done.returncode == 0, done.stderr
        if not all(f"handled token-{token}" in done.stdout for token in tokens):
            return []
        path = daemon.home / "logs" / "talker.log"  # what `kiln logs` read, as records
        records = [orjson.loads(line) for line in path.read_bytes().splitlines()]
        found = {
            r["message"].split("-", 1)[1]
            for r in records
            if "handled token-" in str(r.get("message"))
        }
        return records if found == set(tokens) else []

    records = daemon.wait_until(merged, 30, "every replica's lines in kiln logs")
    lines = [r for r in records if "handled token-" in str(r.get("message"))]
    assert len(lines) == len(tokens)  # each once
    assert {r["node"] for r in lines} == answered  # from every node that answered
    assert all(r.get("replica") for r in lines)
    # The cluster ingress's request records reach the same log.
    assert any(r.get("event") == "request" and r.get("status") == 200 for r in records)

    # Metrics under Kiln's names on the control plane's metrics port, and `kiln get`.
    def counted() -> float:
        text = httpx.get(daemon.info["metrics_url"], headers=daemon.auth, timeout=30).text
        total = 0.0
        for line in text.splitlines():
            if line.startswith("kiln_requests_total{") and 'api="talker"' in line:
                if 'status_class="2xx"' in line:
                    total += float(line.rsplit(" ", 1)[1])
        return total

    assert daemon.wait_until(lambda: counted() >= len(tokens), 30, "requests counted")
    assert (
        'kiln_request_latency_seconds_count{api="talker"}'
        in httpx.get(daemon.info["metrics_url"], headers=daemon.auth, timeout=30).text
    )
    assert daemon.apis()["talker"]["requests"]["2xx"] >= len(tokens)


SPLIT_HANDLER = """
VERSION = "{version}"


def predict(payload, context):
    return {{"version": VERSION}}
"""

SPLIT_CONFIG = """
- kind: deployment
  name: split
""" + "".join(
    f"""
- kind: api
  name: ab
  version: "{v}"
  python: {{handler: v{v}.py}}
  compute: {{cpu: 100m}}
"""
    for v in ("1", "2")
)


def test_versions_and_a_runtime_traffic_split_through_the_proxy(
    daemon: Daemon, tmp_path: Path
) -> None:
    folder = tmp_path / "split"
    for v in ("1", "2"):
        write(folder / f"v{v}.py", SPLIT_HANDLER.format(version=v))
    write(folder / "kiln.yaml", SPLIT_CONFIG)
    deploy(daemon, folder)
    endpoint = daemon.apis()["ab"]["endpoint"]

    def versions(n: int = 40) -> Counter[str]:
        return Counter(call(daemon, endpoint, {}).json()["version"] for _ in range(n))

    assert daemon.wait_until(lambda: set(versions()) <= {"1", "2"}, 30, "both versions routed")
    done = daemon.kiln("traffic", "ab", "1=0", "2=100")
    assert done.returncode == 0, done.stdout + done.stderr
    daemon.wait_until(lambda: versions() == {"2": 40}, 30, "all traffic on version 2")
    back = daemon.kiln("traffic", "ab", "1=100", "2=0")
    assert back.returncode == 0, back.stdout + back.stderr
    daemon.wait_until(lambda: versions() == {"1": 40}, 30, "all traffic on version 1")
