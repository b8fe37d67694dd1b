"""Batch API jobs end to end: a real `kiln serve`, real worker processes, HTTP and the CLI.

One server serves most tests (a module fixture); the restart test runs its own.
Visibility timeouts are 1 s (kiln.yaml `jobs:`), so redeliveries take a second.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from support import KILN, KilnServer, build_linear_onnx, write

from kiln.batch.output import read_jsonl
from kiln.batch.spec import output_folder
from kiln.errors import InvalidInput

PREDICTOR = """
import os, time

class PythonPredictor:
    def __init__(self, config, job_spec):
        self.config = config
        self.job_spec = job_spec
        self.dir = config["marker_dir"]

    def predict(self, payload, batch_id):
        cfg = self.config
        time.sleep(cfg.get("sleep", 0))
        if cfg.get("fail_item") is not None and cfg["fail_item"] in payload:
            raise ValueError(f"cannot score item {cfg['fail_item']}")
        if cfg.get("hang_batch") == batch_id:
            flag = os.path.join(self.dir, "hang-" + batch_id)
            if not os.path.exists(flag):
                with open(flag, "w") as f:
                    f.write(str(os.getpid()))
                time.sleep(60)
        with open(os.path.join(self.dir, "batches"), "a") as f:
            f.write(f"{batch_id} {len(payload)}\\n")
        print(f"scored batch {batch_id}")
        return [{"item": x, "total": self.job_spec["total_batch_count"]} for x in payload]

    def on_job_complete(self):
        with open(os.path.join(self.dir, "complete"), "a") as f:
            f.write(self.job_spec["job_id"] + "\\n")
"""

CONFIG = """\
- kind: BatchAPI
  name: scorer
  predictor:
    type: python
    path: predictor.py
    config: {marker_dir: MARKERS}
  jobs: {visibility_timeout: 1, max_request_bytes: 400000, max_workers: 8}
- kind: BatchAPI
  name: iris-batch
  onnx:
    model: model.onnx
  jobs: {visibility_timeout: 1}
- kind: BatchAPI
  name: broken
  predictor: {type: python, path: broken.py}
"""

BROKEN = """
class PythonPredictor:
    def __init__(self, config):
        raise RuntimeError("no weights here")

    def predict(self, payload):
        return payload
"""


def make_project(root: Path) -> Path:
    markers = root / "markers"
    markers.mkdir(parents=True, exist_ok=True)
    write(root / "predictor.py", PREDICTOR)
    write(root / "broken.py", BROKEN)
    write(root / "kiln.yaml", CONFIG.replace("MARKERS", str(markers)))
    import numpy as np

    build_linear_onnx(root / "model.onnx", np.array([[1.0, 0.0], [0.0, 2.0]]))
    data = root / "data"
    (data / "skip").mkdir(parents=True, exist_ok=True)
    (data / "a.jsonl").write_text("".join(f"{i}\n" for i in range(30)))
    (data / "b.jsonl").write_text("".join(f"{i}\n" for i in range(30, 45)))
    (data / "skip" / "c.jsonl").write_text("99\n")
    (data / "img1.jpg").write_text("x")
    (data / "img2.jpg").write_text("x")
    (data / "skip" / "img3.jpg").write_text("x")
    return markers


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("batch")
    make_project(root / "proj")
    srv = KilnServer(root / "proj", root / "home")
    yield srv
    srv.stop()


@pytest.fixture
def markers(server: KilnServer) -> Path:
    folder = server.project / "markers"
    for f in folder.iterdir():
        f.unlink()
    return folder


def submit(server: KilnServer, spec: dict[str, Any], api: str = "scorer", **kw: Any) -> Any:
    return server.client.post(f"/{api}", content=orjson.dumps(spec), **kw)


def wait_done(server: KilnServer, job_id: str, api: str = "scorer", timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        status = server.client.get(f"/{api}", params={"jobID": job_id}).json()
        if status["job_status"]["status"] not in ("status_enqueuing", "status_running"):
            return status
        assert time.monotonic() < deadline, status
        time.sleep(0.1)


def batch_lines(markers: Path) -> list[str]:
    path = markers / "batches"
    return path.read_text().splitlines() if path.exists() else []


def test_item_list_job_runs_cortex_spec_unchanged(server: KilnServer, markers: Path) -> None:
    # Cortex's documented submission (sqs_dead_letter_queue with an ARN, int timeout).
    spec = {
        "workers": 2,
        "item_list": {"items": list(range(25)), "batch_size": 10},
        "config": {"label": "cortex"},
        "timeout": 300,
        "sqs_dead_letter_queue": {
            "arn": "arn:aws:sqs:us-west-2:123456789:dlq.fifo",
            "max_receive_count": 2,
        },
    }
    response = submit(server, spec)
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["kind"] == "BatchAPI" and job["api_name"] == "scorer" and job["workers"] == 2
    assert job["config"] == {"marker_dir": str(markers), "label": "cortex"}  # job wins, merged
    assert job["created_time"].endswith("Z") and len(job["created_time"].split(".")[1]) == 10
    status = wait_done(server, job["job_id"])
    assert status["job_status"]["status"] == "status_succeeded"
    assert status["job_status"]["total_batch_count"] == 3
    assert status["metrics"]["succeeded"] == 3 and status["metrics"]["failed"] == 0
    assert status["progress"]["items_done"] == 25 and status["progress"]["percent"] == 100.0
    assert sorted(int(line.split()[1]) for line in batch_lines(markers)) == [5, 10, 10]
    assert (markers / "complete").read_text() == job["job_id"] + "\n"
    same = server.client.get(f"/scorer/{job['job_id']}").json()  # the v0.20 path form
    assert same["job_status"]["job_id"] == job["job_id"]


def test_delimited_files_with_output_exact_and_in_order(server: KilnServer, markers: Path) -> None:
    spec = {
        "workers": 3,
        "delimited_files": {
            "paths": ["data"],
            "includes": ["*.jsonl"],
            "excludes": ["skip/**"],
            "batch_size": 4,
        },
        "output": {"path": "out/"},
    }
    job = submit(server, spec).json()
    folder = server.project.resolve() / "out" / job["job_id"]  # kiln serve: <project>/<path>/<id>
    assert job["output"] == {"path": "out/", "format": "jsonl", "location": f"{folder}/"}
    status = wait_done(server, job["job_id"])
    assert status["job_status"]["status"] == "status_succeeded", status
    assert status["job_status"]["total_batch_count"] == 12  # 45 items / 4
    assert status["job_status"]["output"]["location"] == f"{folder}/"
    records = read_jsonl(folder)
    assert [r["index"] for r in records] == list(range(45))
    shown = cli(server, "jobs", "get", "scorer", job["job_id"])
    assert f"output in {folder}/" in shown.stdout.replace("\n", "")
    assert [r["result"]["item"] for r in records] == list(range(45))
    assert records[0]["result"]["total"] == 12  # job_spec.total_batch_count


def test_file_path_lister_includes_excludes_and_dry_run(server: KilnServer, markers: Path) -> None:
    lister = {"s3_paths": ["data/"], "includes": ["**.jpg"], "excludes": ["**/skip/**"]}
    spec = {"workers": 1, "file_path_lister": {**lister, "batch_size": 1}}
    dry = submit(server, spec, params={"dryRun": "true"}).json()
    data = server.project / "data"
    assert dry["files"] == [str(data / "img1.jpg"), str(data / "img2.jpg")]
    job = submit(server, spec).json()
    assert wait_done(server, job["job_id"])["job_status"]["status"] == "status_succeeded"
    assert sorted(batch_lines(markers)) == ["0 1", "1 1"]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"workers": 1}, "exactly one data source"),
        (
            {
                "workers": 1,
                "item_list": {"items": [1], "batch_size": 1},
                "delimited_files": {"paths": ["data"], "batch_size": 1},
            },
            "exactly one data source",
        ),
        ({"workers": 1, "item_list": {"items": [], "batch_size": 1}}, "non-empty list"),
        ({"item_list": {"items": [1], "batch_size": 1}}, "workers is required"),
        ({"workers": 9, "item_list": {"items": [1], "batch_size": 1}}, "jobs.max_workers"),
        ({"workers": 1, "item_list": {"items": [1], "batch_size": 0}}, "at least 1"),
        (
            {"workers": 1, "item_list": {"items": ["x" * 100_000] * 3, "batch_size": 3}},
            "over the batch limit of 256 KiB (jobs.max_batch_bytes)",
        ),
        (
            {"workers": 1, "item_list": {"items": ["x" * 150_000] * 3, "batch_size": 1}},
            "over the request limit of 400000 bytes (jobs.max_request_bytes)",
        ),
        ({"workers": 1, "item_list": {"items": [1], "batch_size": 1}, "timeout": 0}, "timeout"),
        (
            {"workers": 1, "item_list": {"items": [1], "batch_size": 1}, "wokers": 2},
            "unknown key(s) in the job submission: wokers",
        ),
        (
            {"workers": 1, "delimited_files": {"paths": ["nope/"], "batch_size": 1}},
            "does not exist on the server",
        ),
        (
            {
                "workers": 1,
                "item_list": {"items": [1], "batch_size": 1},
                "output": {"path": "out", "format": "csv"},
            },
            "output.format must be jsonl or parquet",
        ),
        (
            {"workers": 1, "item_list": {"items": [1], "batch_size": 1}, "output": {"path": "/o"}},
            "output.path must be relative",
        ),
        (
            {
                "workers": 1,
                "item_list": {"items": [1], "batch_size": 1},
                "output": {"path": "out/../../o"},
            },
            "output.path 'out/../../o' leaves the job's output folder",
        ),
    ],
)
def test_each_limit_is_a_400_naming_it(
    server: KilnServer, spec: dict[str, Any], message: str
) -> None:
    response = submit(server, spec)
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]["message"]


def test_on_job_complete_runs_once_with_several_workers(server: KilnServer, markers: Path) -> None:
    spec = {"workers": 4, "item_list": {"items": list(range(40)), "batch_size": 1}}
    job = submit(server, spec).json()
    status = wait_done(server, job["job_id"])
    assert status["job_status"]["status"] == "status_succeeded"
    assert len(batch_lines(markers)) == 40
    assert (markers / "complete").read_text().splitlines() == [job["job_id"]]


def test_worker_killed_mid_batch_job_still_succeeds_without_duplicates(
    server: KilnServer, markers: Path
) -> None:
    spec = {
        "workers": 2,
        "item_list": {"items": list(range(20)), "batch_size": 2},
        "config": {"hang_batch": "3"},
        "output": {"path": "out"},
    }
    job = submit(server, spec).json()
    flag = markers / "hang-3"
    deadline = time.monotonic() + 30
    while not (flag.exists() and flag.read_text()):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.kill(int(flag.read_text()), signal.SIGKILL)
    status = wait_done(server, job["job_id"])
    assert status["job_status"]["status"] == "status_succeeded", status
    assert status["metrics"] == {**status["metrics"], "succeeded": 10, "failed": 0}
    records = read_jsonl(server.project / "out" / job["job_id"])
    assert [r["index"] for r in records] == list(range(20))  # every item, once
    assert (markers / "complete").read_text().splitlines() == [job["job_id"]]
    log = server.state / "logs" / "jobs" / "scorer" / f"{job['job_id']}.log"
    assert b"restarting it" in log.read_bytes()


def test_always_failing_batch_is_dead_lettered_and_visible(
    server: KilnServer, markers: Path
) -> None:
    spec = {
        "workers": 1,
        "item_list": {"items": list(range(6)), "batch_size": 2},
        "config": {"fail_item": 3},
        "dead_letter": {"max_receive_count": 2},
    }
    job = submit(server, spec).json()
    status = wait_done(server, job["job_id"])
    assert status["job_status"]["status"] == "status_completed_with_failures"
    assert status["job_status"]["status_text"] == "completed with failures"
    assert (status["metrics"]["succeeded"], status["metrics"]["failed"]) == (2, 1)
    assert (markers / "complete").exists()  # after every batch succeeded or was dead-lettered
    failed = cli(server, "jobs", "failed", "scorer", job["job_id"], "-o", "json")
    (letter,) = orjson.loads(failed.stdout)["failed_batches"]
    assert letter["items"] == [2, 3] and letter["receive_count"] == 2
    assert letter["error"] == "ValueError: cannot score item 3"
    table = cli(server, "jobs", "failed", "scorer", job["job_id"])
    assert "cannot score item 3" in table.stdout


def test_stop_halts_workers(server: KilnServer, markers: Path) -> None:
    spec = {
        "workers": 2,
        "item_list": {"items": list(range(50)), "batch_size": 1},
        "config": {"sleep": 0.2},
    }
    job_id = submit(server, spec).json()["job_id"]
    deadline = time.monotonic() + 20
    while len(batch_lines(markers)) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    stopped = server.client.delete("/scorer", params={"jobID": job_id})
    assert stopped.json() == {"message": f"stopped job {job_id}"}
    status = wait_done(server, job_id)
    assert status["job_status"]["status"] == "status_stopped"
    time.sleep(1.0)
    done = len(batch_lines(markers))
    time.sleep(0.6)
    assert len(batch_lines(markers)) == done < 50  # nothing runs any more
    assert not [p for p in server.worker_pids() if "kiln.batch.worker" in _cmdline(p)]


def test_worker_holds_no_store_only_its_channel(server: KilnServer, markers: Path) -> None:
    spec = {
        "workers": 1,
        "item_list": {"items": list(range(40)), "batch_size": 1},
        "config": {"sleep": 0.05},
    }
    job_id = submit(server, spec).json()["job_id"]
    deadline = time.monotonic() + 20
    while len(batch_lines(markers)) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    (pid,) = [p for p in server.worker_pids() if "kiln.batch.worker" in _cmdline(p)]
    links: dict[int, str] = {}
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            links[int(fd.name)] = os.readlink(fd)
    state = str(server.state.resolve())
    assert not [link for link in links.values() if link.startswith(state)], links  # no state.db
    # Besides its stdio (the event loop may keep a copy of those), one socket: its channel.
    others = set(links.values()) - {links[0], links[1], links[2]}
    assert len(others) == 1 and others.pop().startswith("socket:"), links
    assert state not in _cmdline(pid) and "sqlite" not in _cmdline(pid)
    environ = Path(f"/proc/{pid}/environ").read_bytes()
    assert b"KILN_STATE_URL=" not in environ
    assert wait_done(server, job_id)["job_status"]["status"] == "status_succeeded"


def test_output_folder_rules(tmp_path: Path) -> None:
    jobs = tmp_path / "home" / "jobs"
    deployed = output_folder("results/", "j1", "api", project=None, jobs_home=jobs)
    assert deployed == str((jobs / "api" / "j1" / "results").resolve())
    assert output_folder(".", "j1", "api", project=None, jobs_home=jobs) == str(
        (jobs / "api" / "j1").resolve()
    )
    served = output_folder("file://a/b/", "j1", "api", project=tmp_path, jobs_home=jobs)
    assert served == str(tmp_path.resolve() / "a" / "b" / "j1")
    assert output_folder("s3://b/p/", "j1", "api", project=None, jobs_home=jobs) == "s3://b/p/j1"
    (tmp_path / "elsewhere").symlink_to("/tmp")
    for bad in ("/abs", "file:///abs", "~/x", "..", "a/../../b", "elsewhere"):
        with pytest.raises(InvalidInput, match="output.path"):
            output_folder(bad, "j1", "api", project=tmp_path, jobs_home=jobs)


def test_predictor_that_cannot_load_ends_the_job_in_worker_error(server: KilnServer) -> None:
    spec = {"workers": 2, "item_list": {"items": [1, 2, 3], "batch_size": 1}}
    job_id = submit(server, spec, "broken").json()["job_id"]
    status = wait_done(server, job_id, "broken")
    assert status["job_status"]["status"] == "status_worker_error", status
    error = status["job_status"]["error"]
    assert error == "the predictor failed to load: RuntimeError: no weights here"
    assert status["metrics"]["succeeded"] == 0


def test_timeout_ends_a_slow_job(server: KilnServer, markers: Path) -> None:
    spec = {
        "workers": 1,
        "item_list": {"items": list(range(20)), "batch_size": 1},
        "config": {"sleep": 0.3},
        "timeout": 1,
    }
    job_id = submit(server, spec).json()["job_id"]
    status = wait_done(server, job_id)
    assert status["job_status"]["status"] == "status_timed_out"
    assert "timeout of 1s" in status["job_status"]["error"]


def test_onnx_batch_api_without_predictor_writes_results(server: KilnServer) -> None:
    items = [[1.0, 1.0], [2.0, 3.0], [0.5, 0.0]]
    no_output = submit(
        server, {"workers": 1, "item_list": {"items": items, "batch_size": 2}}, "iris-batch"
    )
    assert no_output.status_code == 400 and "output" in no_output.json()["error"]["message"]
    spec = {
        "workers": 2,
        "item_list": {"items": items, "batch_size": 2},
        "output": {"path": "onnx"},
    }
    job = submit(server, spec, "iris-batch").json()
    status = wait_done(server, job["job_id"], "iris-batch")
    assert status["job_status"]["status"] == "status_succeeded", status
    records = read_jsonl(server.project / "onnx" / job["job_id"])
    assert [r["result"] for r in records] == [[1.0, 2.0], [2.0, 6.0], [0.5, 0.0]]


def test_cli_submit_get_list_and_logs(server: KilnServer, markers: Path, tmp_path: Path) -> None:
    spec = write(
        tmp_path / "job.json",
        orjson.dumps({"workers": 1, "item_list": {"items": [1, 2, 3], "batch_size": 2}}).decode(),
    )
    done = cli(server, "jobs", "submit", "scorer", str(spec))
    job_id = done.stdout.strip()
    watched = cli(server, "jobs", "get", "scorer", job_id, "-w")
    assert "succeeded" in watched.stdout and "3/3" in watched.stdout
    listing = cli(server, "jobs", "list", "scorer")
    assert job_id in listing.stdout
    logs = cli(server, "logs", "scorer", job_id)
    assert "enqueuing complete: 2 batches, 3 items" in logs.stdout
    assert "[worker 0] scored batch 0" in logs.stdout
    missing = cli(server, "jobs", "get", "scorer", "nope", check=False)
    assert missing.returncode != 0 and "has no job 'nope'" in missing.stderr


def cli(server: KilnServer, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KILN_MANAGEMENT_URL": server.management_url or "", "COLUMNS": "200"}
    done = subprocess.run([*KILN, *args], capture_output=True, text=True, env=env, timeout=120)
    if check:
        assert done.returncode == 0, done.stdout + done.stderr
    return done


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_server_killed_mid_job_resumes_and_completes(tmp_path: Path) -> None:
    markers = make_project(tmp_path / "proj")
    home = tmp_path / "home"
    spec = {
        "workers": 1,
        "item_list": {"items": list(range(30)), "batch_size": 1},
        "config": {"sleep": 0.1},
        "output": {"path": "out"},
    }
    first = KilnServer(tmp_path / "proj", home)
    try:
        job_id = submit(first, spec).json()["job_id"]
        deadline = time.monotonic() + 30
        while len(batch_lines(markers)) < 8:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        first.proc.send_signal(signal.SIGKILL)  # the server only: workers die with it
        first.proc.wait(10)
    finally:
        first.stop()
    (home / "state" / "server.json").unlink()  # a SIGKILLed server leaves it behind
    done_before = len(batch_lines(markers))
    assert done_before < 30
    second = KilnServer(tmp_path / "proj", home)
    try:
        status = wait_done(second, job_id)
        assert status["job_status"]["status"] == "status_succeeded", status
        assert status["metrics"]["succeeded"] == 30
        records = read_jsonl(tmp_path / "proj" / "out" / job_id)
        assert [r["index"] for r in records] == list(range(30))  # none lost, none twice
        assert (markers / "complete").read_text().splitlines() == [job_id]
    finally:
        second.stop()


def test_unknown_job_and_methods(server: KilnServer) -> None:
    assert server.client.get("/scorer", params={"jobID": "nope"}).status_code == 404
    assert server.client.put("/scorer").status_code == 405
    listing = server.client.get("/scorer").json()
    assert listing["api_name"] == "scorer" and isinstance(listing["jobs"], list)
    assert httpx.get(f"{server.management_url}/apis/scorer/jobs").status_code == 200
