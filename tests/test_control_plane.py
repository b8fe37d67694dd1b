"""The durable platform through the CLI, as a user runs it: start, deploy, get, predict,
logs, delete, crash and restart, rolling updates under traffic, broken revisions, rollback."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import orjson
import pytest
from daemon import Daemon
from support import write

HANDLER = """
import os

VERSION = "{version}"


class Handler:
    def load(self, model_dir, config):
        if VERSION == "broken":
            raise RuntimeError("this revision cannot load its model")

    def predict(self, payload, context):
        return {{"version": VERSION, "echo": payload, "secret": os.environ.get("SECRET")}}
"""

CONFIG = """
- kind: deployment
  name: shop
- kind: api
  name: echo
  python:
    handler: handler.py:Handler
  tracker:
    model_type: classification
    key: version
"""


def project(folder: Path, version: str, extra_config: str = "") -> Path:
    write(folder / "handler.py", HANDLER.format(version=version))
    write(folder / "kiln.yaml", CONFIG + extra_config)
    return folder


@pytest.fixture
def daemon(tmp_path: Path):
    d = Daemon(tmp_path / "home")
    d.start()
    yield d
    d.stop()


def deploy(d: Daemon, folder: Path, *args: str) -> str:
    done = d.kiln("deploy", str(folder), *args)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_deploy_get_predict_logs_delete_as_a_new_user(daemon: Daemon, tmp_path: Path) -> None:
    folder = project(tmp_path / "shop", "v1")
    out = deploy(daemon, folder)
    assert "is live" in out and f"{daemon.url}/shop/echo" in out and "curl -X POST" in out
    again = deploy(daemon, folder)
    assert "Nothing to do" in again

    predicted = daemon.kiln("predict", "echo", '{"a": 1}')
    assert predicted.returncode == 0, predicted.stderr
    assert orjson.loads(predicted.stdout)["version"] == "v1"
    daemon.http.post(f"{daemon.url}/shop/echo", content=b"{broken")

    echo = daemon.apis()["echo"]
    assert echo["status"] == "live" and echo["deployment"] == "shop"
    assert echo["replicas"]["ready"] == 1
    assert echo["requests"]["2xx"] == 1 and echo["requests"]["4xx"] == 1
    assert echo["latency_ms"]["p50"] is not None
    detail = daemon.kiln("get", "echo")
    assert detail.returncode == 0, detail.stderr
    assert "?debug=true" in detail.stdout and "v1" in detail.stdout

    logs = daemon.kiln("logs", "echo")
    assert logs.returncode == 0, logs.stderr
    assert "POST /shop/echo 200" in logs.stdout and "is live" in logs.stdout

    status = daemon.kiln("server", "status", "-o", "json")
    assert status.returncode == 0 and orjson.loads(status.stdout)["apis"] == 1

    refused = daemon.kiln("delete", "echo", input="n\n")
    assert refused.returncode == 1 and "Nothing deleted" in refused.stdout
    deleted = daemon.kiln("delete", "echo", "-f")
    assert deleted.returncode == 0, deleted.stderr
    assert daemon.http.post(f"{daemon.url}/shop/echo", json=1).status_code == 404
    missing = daemon.kiln("get", "echo")
    assert missing.returncode == 2 and "no API named 'echo'" in missing.stderr


def test_sigkill_and_restart_brings_back_apis_counters_and_tracker(
    daemon: Daemon, tmp_path: Path
) -> None:
    folder = project(tmp_path / "shop", "v1", "  compute: {min_replicas: 1, max_replicas: 3}\n")
    deploy(daemon, folder)
    for i in range(5):
        assert daemon.http.post(f"{daemon.url}/shop/echo", json=i).status_code == 200
    before = daemon.apis()["echo"]
    assert before["requests"]["2xx"] == 5
    pid = daemon.info["pid"]
    workers = daemon.worker_pids(pid)
    assert workers
    time.sleep(1.5)  # one flush interval of the durable counters
    os.kill(pid, signal.SIGKILL)
    daemon.wait_until(
        lambda: not any(Path(f"/proc/{w}").exists() for w in workers), 15, "workers to exit"
    )
    daemon.start()
    assert daemon.info["pid"] != pid
    after = daemon.apis()["echo"]
    assert after["status"] == "live" and after["revision"] == before["revision"]
    assert after["requests"]["2xx"] == 5
    assert daemon.http.post(f"{daemon.url}/shop/echo", json="again").json()["version"] == "v1"
    monitoring = daemon.http.get(f"{daemon.management_url}/apis/echo").json()["tracker"]
    assert monitoring["classes"] == {"v1": 6}


def test_redeploy_under_traffic_fails_no_request(daemon: Daemon, tmp_path: Path) -> None:
    folder = project(tmp_path / "shop", "v1")
    deploy(daemon, folder)
    url = f"{daemon.url}/shop/echo"
    seen: Counter[str] = Counter()
    failures: list[str] = []
    stop = threading.Event()

    def traffic() -> None:
        with httpx.Client(timeout=30, headers=daemon.auth) as client:
            while not stop.is_set():
                response = client.post(url, json=1)
                if response.status_code != 200:
                    failures.append(f"{response.status_code} {response.text}")
                else:
                    seen[response.json()["version"]] += 1

    threads = [threading.Thread(target=traffic) for _ in range(4)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.5)
        project(folder, "v2")
        out = deploy(daemon, folder)
        assert "is live" in out
        time.sleep(0.5)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert failures == []
    assert seen["v1"] > 0 and seen["v2"] > 0
    assert daemon.http.post(url, json=1).json()["version"] == "v2"


def test_a_broken_revision_leaves_the_old_one_serving(daemon: Daemon, tmp_path: Path) -> None:
    folder = project(tmp_path / "shop", "v1")
    deploy(daemon, folder)
    good = daemon.apis()["echo"]["revision"]
    project(folder, "broken")
    done = daemon.kiln("deploy", str(folder))
    assert done.returncode == 1
    assert "cannot load its model" in done.stderr and "keeps serving" in done.stderr
    assert daemon.http.post(f"{daemon.url}/shop/echo", json=1).json()["version"] == "v1"
    detail = orjson.loads(daemon.kiln("get", "echo", "-o", "json").stdout)
    assert detail["revision"] == good and detail["status"] == "live"
    assert any("cannot load its model" in e["error"] for e in detail["recent_errors"])


def test_rollback_and_refresh(daemon: Daemon, tmp_path: Path) -> None:
    folder = project(tmp_path / "shop", "v1")
    deploy(daemon, folder)
    first = daemon.apis()["echo"]["revision"]
    project(folder, "v2")
    deploy(daemon, folder)
    assert daemon.http.post(f"{daemon.url}/shop/echo", json=1).json()["version"] == "v2"
    rolled = daemon.kiln("rollback", "echo")
    assert rolled.returncode == 0, rolled.stderr
    assert daemon.http.post(f"{daemon.url}/shop/echo", json=1).json()["version"] == "v1"
    assert daemon.apis()["echo"]["revision"] == first
    unknown = daemon.kiln("rollback", "echo", "ffffffff")
    assert unknown.returncode == 2 and "no revision 'ffffffff'" in unknown.stderr

    before = set(daemon.worker_pids())
    refreshed = daemon.kiln("refresh", "echo")
    assert refreshed.returncode == 0, refreshed.stderr
    # `refresh` returns once the new replicas serve; the old ones drain and exit after.
    after = daemon.wait_until(
        lambda: (now := set(daemon.worker_pids())) and not now & before and now,
        30,
        "every old worker replaced by a new one",
    )
    assert after and not before & after, "refresh must replace every replica"
    assert daemon.http.post(f"{daemon.url}/shop/echo", json=1).json()["version"] == "v1"


def test_kilnignore_dotenv_and_config_errors(daemon: Daemon, tmp_path: Path) -> None:
    folder = project(tmp_path / "shop", "v1")
    write(folder / ".kilnignore", "data/\n*.bin\n")
    write(folder / "data" / "huge.csv", "a,b\n" * 10)
    write(folder / "weights.bin", "x")
    write(folder / ".env", "SECRET=from-dotenv\n")
    deploy(daemon, folder)
    answer = daemon.http.post(f"{daemon.url}/shop/echo", json=1).json()
    assert answer["secret"] == "from-dotenv"
    revision = daemon.apis()["echo"]["revision"]
    artifacts = list((daemon.home / "artifacts" / "shop").glob(f"{revision}*"))
    assert len(artifacts) == 1
    shipped = {p.relative_to(artifacts[0]).as_posix() for p in artifacts[0].rglob("*")}
    assert "handler.py" in shipped and ".env" in shipped
    assert "weights.bin" not in shipped and not any(p.startswith("data") for p in shipped)

    write(folder / "kiln.yaml", CONFIG.replace("name: echo", "name: Echo_API"))
    bad = daemon.kiln("deploy", str(folder))
    assert bad.returncode == 2
    assert "kiln.yaml" in bad.stderr and "name" in bad.stderr


def test_api_names_belong_to_one_deployment(daemon: Daemon, tmp_path: Path) -> None:
    deploy(daemon, project(tmp_path / "shop", "v1"))
    other = project(tmp_path / "other", "v9")
    write(other / "kiln.yaml", CONFIG.replace("name: shop", "name: other"))
    done = daemon.kiln("deploy", str(other))
    assert done.returncode == 1 and "already belongs to 'shop'" in done.stderr
    assert daemon.http.post(f"{daemon.url}/shop/echo", json=1).json()["version"] == "v1"


def test_management_rest_refuses_bad_uploads_and_documents_itself(daemon: Daemon) -> None:
    base = daemon.management_url
    wrong_type = daemon.http.post(f"{base}/deployments", json={"a": 1})
    assert wrong_type.status_code == 415 and "gzip" in wrong_type.json()["message"]
    garbage = daemon.http.post(
        f"{base}/deployments", content=b"not a tar", headers={"Content-Type": "application/gzip"}
    )
    assert garbage.status_code == 400 and "not a valid deploy archive" in garbage.json()["message"]
    assert daemon.http.get(f"{base}/deployments/nope").status_code == 404
    assert daemon.http.delete(f"{base}/apis/nope").json()["code"] == 404

    from openapi_spec_validator import validate

    document = daemon.http.get(f"{base}/openapi.json").json()
    validate(document)
    assert "/deployments" in document["paths"] and "/models" in document["paths"]
    page = daemon.http.get(f"{base}/docs")
    assert page.status_code == 200 and "/apis/{name}/rollback" in page.text


def test_environments_choose_the_server(daemon: Daemon, tmp_path: Path) -> None:
    deploy(daemon, project(tmp_path / "shop", "v1"))
    added = daemon.kiln("env", "add", "staging", daemon.management_url, "--key", daemon.admin_key)
    assert added.returncode == 0, added.stderr
    listed = daemon.kiln("env", "list")
    assert "staging" in listed.stdout and daemon.management_url in listed.stdout
    via_env = daemon.kiln("get", "--env", "staging", "-o", "json")
    assert orjson.loads(via_env.stdout)["apis"][0]["name"] == "echo"
    assert daemon.kiln("env", "default", "staging").returncode == 0
    predicted = daemon.kiln("predict", "echo", '"hi"')
    assert predicted.returncode == 0 and orjson.loads(predicted.stdout)["echo"] == "hi"
    daemon.kiln("env", "add", "nowhere", "http://127.0.0.1:9")
    assert daemon.kiln("env", "default", "nowhere").returncode == 0
    unreachable = daemon.kiln("get")
    assert unreachable.returncode == 2 and "cannot reach" in unreachable.stderr
    assert daemon.kiln("env", "default", "local").returncode == 0
    unknown = daemon.kiln("get", "--env", "prod")
    assert unknown.returncode == 2 and "no environment named 'prod'" in unknown.stderr


def test_one_server_per_home_and_stop_when_not_running(daemon: Daemon) -> None:
    again = daemon.kiln("server", "start", "--port", "0", "--management-port", "0")
    assert again.returncode == 0 and "already running" in again.stdout
    run = daemon.kiln(
        "server", "run", "--port", "0", "--management-port", "0", "--metrics-port", "0"
    )
    assert run.returncode == 1 and "already running" in run.stderr
    daemon.stop()
    status = daemon.kiln("server", "status")
    assert status.returncode == 1 and "kiln server start" in status.stdout


def test_an_api_scaled_to_zero_stays_at_zero_across_a_restart(
    daemon: Daemon, tmp_path: Path
) -> None:
    folder = project(
        tmp_path / "shop",
        "v1",
        "  compute: {min_replicas: 0, max_replicas: 2}\n"
        "  autoscaling: {idle_timeout: 1s, downscale_stabilization_period: 0s}\n",
    )
    deploy(daemon, folder)
    assert daemon.http.post(f"{daemon.url}/shop/echo", json=1).status_code == 200
    daemon.wait_until(
        lambda: daemon.apis()["echo"]["status"] == "scaled to zero", 60, "scale to zero"
    )
    daemon.wait_until(lambda: daemon.worker_pids() == [], 10, "the last worker to exit")
    detail = orjson.loads(daemon.kiln("get", "echo", "-o", "json").stdout)
    assert any(e["to"] == 0 for e in detail["scaling_events"])
    daemon.stop()
    daemon.start()
    assert daemon.apis()["echo"]["status"] == "scaled to zero"
    assert daemon.worker_pids() == []
    cold = daemon.http.post(f"{daemon.url}/shop/echo", json="wake", timeout=60)
    assert cold.status_code == 200 and cold.json()["echo"] == "wake"
    assert len(daemon.worker_pids()) == 1


BATCH_PREDICTOR = """
import time


class PythonPredictor:
    def __init__(self, config, job_spec):
        self.sleep = config.get("sleep", 0)

    def predict(self, payload, batch_id):
        time.sleep(self.sleep)
        return [x * 2 for x in payload]
"""


def test_deploy_a_batch_api_run_a_job_and_delete_it(daemon: Daemon, tmp_path: Path) -> None:
    folder = tmp_path / "jobs"
    write(folder / "predictor.py", BATCH_PREDICTOR)
    write(
        folder / "kiln.yaml",
        "- kind: BatchAPI\n  name: doubler\n  predictor: {type: python, path: predictor.py}\n",
    )
    deploy(daemon, folder)
    listed = daemon.apis()["doubler"]
    assert listed["kind"] == "BatchAPI" and listed["status"] == "live"
    spec = {"workers": 1, "item_list": {"items": [1, 2, 3], "batch_size": 2}}
    job = daemon.http.post(f"{daemon.url}/doubler", json={**spec, "output": {"path": "out"}})
    assert job.status_code == 200, job.text
    job_id = job.json()["job_id"]
    out = (daemon.home / "jobs" / "doubler" / job_id / "out").resolve()  # a deployed API's
    assert job.json()["output"]["location"] == f"{out}/"
    done = daemon.wait_until(
        lambda: (
            (s := daemon.http.get(f"{daemon.url}/doubler/{job_id}").json())["job_status"]["status"]
            == "status_succeeded"
            and s
        ),
        60,
        "the job",
    )
    assert done["metrics"]["succeeded"] == 2
    assert sorted(p.name for p in out.iterdir()) == ["part-000000.jsonl", "part-000001.jsonl"]
    # A slow job is stopped when its API is deleted.
    slow = daemon.http.post(f"{daemon.url}/doubler", json={**spec, "config": {"sleep": 30}}).json()[
        "job_id"
    ]
    assert daemon.kiln("delete", "doubler", "-f").returncode == 0
    assert daemon.http.post(f"{daemon.url}/doubler", json=spec).status_code == 404
    final = daemon.http.get(f"{daemon.management_url}/apis")
    assert "doubler" not in {a["name"] for a in final.json()["apis"]}
    from kiln.control.store import Store

    with Store(f"sqlite:///{daemon.home / 'state.db'}") as store:
        assert store.get_job(slow).status == "stopped"
