"""The worker boundary, attacked: a hostile user's handler on a real `kiln server`.

Mallory deploys code that tries, from inside her worker, everything the
sandbox issue saw work: read the admin key, the state database, another user's
revision and the server's environment; accept() on inherited descriptors;
connect to the server's ports and PostgreSQL; fork a thousand processes;
allocate past compute.mem. Each attempt must fail, and a secret planted in the
server's environment must be absent from every answer.

Where this machine lacks the mechanism, the tests skip with the reason; with
CI=true they fail instead, so CI can never pass without the sandbox.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import orjson
import pytest
from daemon import Daemon
from support import write

from kiln.sandbox import probe
from kiln.sandbox.spec import DEFAULT_MAX_PIDS

PLANTED = "planted-secret-5a1f0c9e"

ATTACKS = r"""
import errno, os, socket, time

def _try(fn):
    try:
        return "OK:" + str(fn())[:200]
    except BaseException as exc:  # noqa: BLE001
        return "FAILED:" + type(exc).__name__


def _read(path):
    with open(path, "rb") as f:
        return f.read(64)


def _listdir(path):
    return os.listdir(path)


def _descriptors():
    found = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            s = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue
        try:
            listening = s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
            found.append({"fd": fd, "family": int(s.family), "listening": bool(listening)})
        except OSError:
            pass
        finally:
            s.close()
    return found


def _accept_all():
    accepted = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            s = socket.socket(fileno=os.dup(int(name)))
        except OSError:
            continue
        try:
            s.setblocking(False)  # shared with the original descriptor: restored below
            s.accept()
            accepted += 1
        except OSError:
            pass
        finally:
            s.setblocking(True)
            s.close()
    return accepted


def _connect(port):
    with socket.create_connection(("127.0.0.1", port), timeout=2):
        return "connected"


def _fork_many(n):
    n = int(n)
    pids, error = [], None
    for _ in range(n):
        try:
            pid = os.fork()
        except OSError as exc:
            error = errno.errorcode.get(exc.errno, str(exc.errno))
            break
        if pid == 0:
            time.sleep(1.5)
            os._exit(0)
        pids.append(pid)
    for pid in pids:
        os.waitpid(pid, 0)
    return {"forked": len(pids), "error": error}


class Mallory:
    def predict(self, payload, context):
        home = payload["home"]
        out = {
            "admin_key": _try(lambda: _read(os.path.join(home, "admin.key"))),
            "state_db": _try(lambda: _read(os.path.join(home, "state.db"))),
            "artifacts": _try(lambda: _listdir(os.path.join(home, "artifacts"))),
            "other_user": _try(lambda: _read(payload["other_file"])),
            "home_listing": _try(lambda: _listdir(home)),
            "etc_shadow": _try(lambda: _read("/etc/shadow")),
            "environ": dict(os.environ),
            "descriptors": _descriptors(),
            "accepted": _accept_all(),
            "connect": {str(p): _try(lambda p=p: _connect(p)) for p in payload["ports"]},
            "uid": os.getuid(),
        }
        if payload.get("fork"):
            out["fork"] = _fork_many(payload["fork"])
        return out


class Hog:
    def predict(self, payload, context):
        hoard = bytearray(payload["mib"] * 2**20)
        for i in range(0, len(hoard), 4096):
            hoard[i] = 1
        return len(hoard)
"""


def need_sandbox() -> None:
    caps = probe()
    if caps.available:
        return
    reason = "; ".join(caps.problems)
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI must run the sandbox tests, but: {reason}")
    pytest.skip(f"the sandbox is not available here: {reason}")


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory):
    need_sandbox()
    root = tmp_path_factory.mktemp("sandbox")
    d = Daemon(root / "home")
    d.env["KILN_PLANTED"] = PLANTED  # the server's environment holds a secret
    for name in [n for n in d.env if n.startswith("AWS_")]:
        del d.env[name]  # cloud credentials come from each deployment's .env only
    d.start()
    keys = {}
    for user in ("alice", "mallory"):
        made = d.kiln("users", "create", user, "-o", "json")
        assert made.returncode == 0, made.stderr
        keys[user] = orjson.loads(made.stdout)["key"]
    write(root / "alice" / "secret_handler.py", f"SECRET = 'alice-{PLANTED}'\n")
    write(
        root / "alice" / "kiln.yaml",
        "- kind: deployment\n  name: shop\n"
        "- kind: api\n  name: private\n  python: {handler: secret_handler.py:Model}\n",
    )
    with open(root / "alice" / "secret_handler.py", "a") as f:
        f.write("class Model:\n    def predict(self, payload, context):\n        return 1\n")
    mallory = root / "mallory"
    write(mallory / "attack.py", ATTACKS)
    write(
        mallory / "kiln.yaml",
        "- kind: deployment\n  name: tools\n"
        "- kind: api\n  name: probe\n  python: {handler: attack.py:Mallory}\n"
        "  serving: {response_timeout_s: 60}\n"
        "- kind: api\n  name: hog\n  python: {handler: attack.py:Hog}\n"
        "  compute: {mem: 200Mi}\n",
    )
    for user, folder in (("alice", root / "alice"), ("mallory", mallory)):
        env = {**d.env, "KILN_API_KEY": keys[user]}
        done = d.kiln_env(env, "deploy", str(folder))
        assert done.returncode == 0, done.stdout + done.stderr
    d.keys = keys
    yield d
    d.stop()


def _ports(d: Daemon) -> list[int]:
    info = d.info
    ports = [info["ports"][k] for k in ("inference", "management", "metrics")]
    postgres = os.environ.get("KILN_TEST_POSTGRES_URL")
    if postgres:
        ports.append(urlparse(postgres.replace("+psycopg", "")).port or 5432)
    return ports


def _call(d: Daemon, api: str, payload: dict) -> dict:
    response = d.http.post(
        f"{d.url}/mallory/{api}",
        headers={"Authorization": f"Bearer {d.keys['mallory']}"},
        json=payload,
        timeout=90,
    )
    assert response.status_code == 200, response.text
    assert PLANTED not in response.text, "the server's secret reached a user's answer"
    assert d.admin_key not in response.text
    return response.json()


def test_a_users_handler_reaches_nothing_of_the_server(platform: Daemon) -> None:
    d = platform
    other = next((d.home / "artifacts").glob("alice.shop/*/secret_handler.py"))
    out = _call(d, "probe", {"home": str(d.home), "other_file": str(other), "ports": _ports(d)})
    for attempt in ("admin_key", "state_db", "other_user"):
        assert out[attempt].startswith("FAILED:"), (attempt, out[attempt])
    # KILN_HOME exists inside only as the path down to her own revision.
    assert out["home_listing"] == "OK:['artifacts']", out["home_listing"]
    assert out["artifacts"] == "OK:['mallory.tools']", out["artifacts"]
    assert out["etc_shadow"].startswith("FAILED:")
    # The environment is the minimal base plus the deployment's own: no server variable.
    assert "KILN_PLANTED" not in out["environ"]
    assert "KILN_HOME" not in out["environ"]
    assert out["environ"]["HOME"] == "/tmp"
    # Descriptors: only AF_UNIX pairs (its output and IPC channel); no TCP socket of the
    # server, nothing listening (test_worker_process.py counts the descriptors exactly).
    sockets = out["descriptors"]
    assert {s["family"] for s in sockets} == {1}, sockets
    assert not any(s["listening"] for s in sockets)
    assert out["accepted"] == 0
    # Network: loopback of its own; the server's ports and PostgreSQL are unreachable.
    for port, result in out["connect"].items():
        assert result.startswith("FAILED:"), (port, result)
    if probe().per_tenant_uids:
        assert out["uid"] >= 200000 and out["uid"] != os.getuid()


def test_a_fork_bomb_stops_at_the_process_limit(platform: Daemon) -> None:
    d = platform
    assert DEFAULT_MAX_PIDS < 1000  # the worker's own threads count too
    payload = {"home": str(d.home), "other_file": "/x", "ports": [], "fork": 1000}
    out = _call(d, "probe", payload)
    assert out["fork"]["forked"] < DEFAULT_MAX_PIDS
    assert out["fork"]["error"] == "EAGAIN", out["fork"]
    # The worker survives and answers again.
    again = _call(d, "probe", {"home": "/", "other_file": "/x", "ports": []})
    assert again["admin_key"].startswith("FAILED:")


def test_allocating_past_compute_mem_is_stopped_by_the_kernel(platform: Daemon) -> None:
    d = platform
    headers = {"Authorization": f"Bearer {d.keys['mallory']}"}
    small = d.http.post(f"{d.url}/mallory/hog", headers=headers, json={"mib": 20}, timeout=60)
    assert small.status_code == 200 and small.json() == 20 * 2**20
    big = d.http.post(f"{d.url}/mallory/hog", headers=headers, json={"mib": 1024}, timeout=60)
    assert big.status_code == 503, big.text
    assert "memory" in big.text
    status = d.wait_until(
        lambda: d.apis()["mallory.hog"]["status"] == "live" and d.apis()["mallory.hog"],
        what="the hog API to come back",
    )
    assert status["replicas"]["ready"] >= 1
    again = d.http.post(f"{d.url}/mallory/hog", headers=headers, json={"mib": 20}, timeout=60)
    assert again.status_code == 200


def test_server_refuses_to_start_without_the_sandbox_unless_told(tmp_path: Path) -> None:
    d = Daemon(tmp_path / "home")
    empty = tmp_path / "empty-path"
    empty.mkdir()
    d.env["PATH"] = str(empty)  # no bwrap, no setpriv: the sandbox cannot be built
    done = d.kiln("server", "run", "--port", "0", "--management-port", "0", "--metrics-port", "0")
    assert done.returncode != 0
    text = done.stdout + done.stderr
    assert "bubblewrap" in text and "--unsafe-no-sandbox" in text
    assert "Traceback" not in text
    started = d.kiln(
        "server", "start", "--port", "0", "--management-port", "0", "--metrics-port", "0",
        "--unsafe-no-sandbox",
    )  # fmt: skip
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        status = subprocess.run(
            ["cat", str(d.home / "server.json")], capture_output=True, text=True
        ).stdout
        assert "OFF" in orjson.loads(status)["sandbox"]
    finally:
        d.stop()


def test_a_remote_model_is_fetched_by_the_server_with_the_deployments_credentials(
    platform: Daemon, tmp_path: Path
) -> None:
    """The worker has no network: the server fetches its s3:// model, using the
    credentials in the deployment's .env (the server's environment has none)."""
    pytest.importorskip("moto")
    pytest.importorskip("s3fs")
    import numpy as np
    from storage_servers import BUCKET, S3Server
    from support import build_linear_onnx

    s3 = S3Server(tmp_path / "requests.log")
    try:
        weights = np.array([[1, 2], [3, 4]], dtype=np.float32)
        model = build_linear_onnx(tmp_path / "m.onnx", weights)
        s3.put("sandboxed/m.onnx", model.read_bytes())
        project = tmp_path / "remote"
        write(
            project / "kiln.yaml",
            f"- kind: api\n  name: remote\n  onnx: {{model: 's3://{BUCKET}/sandboxed/m.onnx'}}\n",
        )
        dotenv = "".join(f"{k}={v}\n" for k, v in s3.env().items())
        write(project / ".env", dotenv)
        assert not any(k.startswith("AWS_") for k in platform.env)
        done = platform.kiln("deploy", str(project))
        assert done.returncode == 0, done.stdout + done.stderr
        answer = platform.http.post(
            f"{platform.url}/v2/models/remote/infer",
            json={"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 1]}]},
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["outputs"][0]["data"] == [4.0, 6.0]
        assert s3.gets("sandboxed/m.onnx") == 1
    finally:
        platform.kiln("delete", "remote", "-f")
        s3.stop()


def test_kiln_serve_runs_workers_as_before_unless_asked_to_sandbox(tmp_path: Path) -> None:
    need_sandbox()
    from support import KilnServer

    project = tmp_path / "dev"
    write(
        project / "h.py",
        "import os\n"
        "class Model:\n"
        "    def predict(self, payload, context):\n"
        "        try:\n"
        "            open(payload['path']).read(1)\n"
        "            seen = True\n"
        "        except OSError:\n"
        "            seen = False\n"
        "        return {'seen': seen, 'planted': os.environ.get('KILN_PLANTED')}\n",
    )
    write(project / "kiln.yaml", "- kind: api\n  name: dev\n  python: {handler: h.py:Model}\n")
    outside = tmp_path / "outside.txt"
    outside.write_text("x")
    for extra, expected in (([], {"seen": True, "planted": PLANTED}), (["--sandbox"], None)):
        server = KilnServer(
            project, tmp_path / f"home{len(extra)}", extra, {"KILN_PLANTED": PLANTED}
        )
        try:
            answer = server.client.post("/dev", json={"path": str(outside)})
            assert answer.status_code == 200, server.output()
            body = answer.json()
            if expected is not None:
                assert body == expected  # development: the developer's own environment and files
            else:
                assert body == {"seen": False, "planted": None}
        finally:
            server.stop()


BATCH_ATTACK = r"""
import os, socket


def _try(fn):
    try:
        fn()
        return "OK"
    except BaseException as exc:  # noqa: BLE001
        return "FAILED:" + type(exc).__name__


class PythonPredictor:
    def __init__(self, config, job_spec):
        self.config = config

    def predict(self, payload, batch_id):
        home, port = self.config["home"], self.config["port"]
        return [
            {
                "admin_key": _try(lambda: open(os.path.join(home, "admin.key")).read()),
                "state_db": _try(lambda: open(os.path.join(home, "state.db"), "rb").read(1)),
                "management": _try(lambda: socket.create_connection(("127.0.0.1", port), 2)),
                "planted": os.environ.get("KILN_PLANTED"),
                "uid": os.getuid(),
            }
            for _ in payload
        ]
"""


def test_a_users_batch_worker_is_sandboxed_and_writes_only_its_output(
    platform: Daemon, tmp_path: Path
) -> None:
    d = platform
    folder = tmp_path / "sweeper"
    write(folder / "predictor.py", BATCH_ATTACK)
    write(
        folder / "kiln.yaml",
        "- kind: BatchAPI\n  name: sweep\n  predictor: {type: python, path: predictor.py}\n",
    )
    env = {**d.env, "KILN_API_KEY": d.keys["mallory"]}
    done = d.kiln_env(env, "deploy", str(folder))
    assert done.returncode == 0, done.stdout + done.stderr
    headers = {"Authorization": f"Bearer {d.keys['mallory']}"}
    spec = {
        "workers": 1,
        "item_list": {"items": [1], "batch_size": 1},
        "config": {"home": str(d.home), "port": d.info["ports"]["management"]},
        "output": {"path": "out"},
    }
    job = d.http.post(f"{d.url}/mallory/sweep", headers=headers, json=spec)
    assert job.status_code == 200, job.text
    job_id = job.json()["job_id"]
    status = d.wait_until(
        lambda: (
            (s := d.http.get(f"{d.url}/mallory/sweep/{job_id}", headers=headers).json())[
                "job_status"
            ]["status"]
            in ("status_succeeded", "status_completed_with_failures")
            and s
        ),
        60,
        "the batch job",
    )
    assert status["job_status"]["status"] == "status_succeeded", status
    location = Path(job.json()["output"]["location"])
    rows = [
        orjson.loads(line)["result"]
        for p in location.glob("*.jsonl")
        for line in p.read_text().splitlines()
    ]
    assert len(rows) == 1, rows
    row = rows[0]
    assert row["admin_key"].startswith("FAILED") and row["state_db"].startswith("FAILED")
    assert row["management"].startswith("FAILED")
    assert row["planted"] is None
    if probe().per_tenant_uids:
        assert row["uid"] >= 200000


def test_the_admins_file_path_lister_job_reads_its_local_files_in_the_sandbox(
    platform: Daemon, tmp_path: Path
) -> None:
    d = platform
    data = tmp_path / "data"
    for i in range(3):
        write(data / f"f{i}.txt", f"line {i}")
    folder = tmp_path / "reader"
    write(
        folder / "predictor.py",
        "class PythonPredictor:\n"
        "    def __init__(self, config, job_spec):\n        pass\n"
        "    def predict(self, payload, batch_id):\n"
        "        return [open(p).read() for p in payload]\n",
    )
    write(
        folder / "kiln.yaml",
        "- kind: BatchAPI\n  name: reader\n  predictor: {type: python, path: predictor.py}\n",
    )
    done = d.kiln("deploy", str(folder))
    assert done.returncode == 0, done.stdout + done.stderr
    spec = {
        "workers": 1,
        "file_path_lister": {"paths": [str(data)], "batch_size": 3},
        "output": {"path": "out"},
    }
    job = d.http.post(f"{d.url}/reader", json=spec)
    assert job.status_code == 200, job.text
    job_id = job.json()["job_id"]
    d.wait_until(
        lambda: (
            d.http.get(f"{d.url}/reader/{job_id}").json()["job_status"]["status"]
            == "status_succeeded"
        ),
        60,
        "the file job",
    )
    location = Path(job.json()["output"]["location"])
    rows = [
        orjson.loads(line)["result"]
        for p in location.glob("*.jsonl")
        for line in p.read_text().splitlines()
    ]
    assert sorted(rows) == ["line 0", "line 1", "line 2"]


def test_a_project_only_its_owner_may_read_gets_a_fix_not_a_bare_permission_error(
    tmp_path: Path,
) -> None:
    """`kiln serve --sandbox` as root runs the worker as the tenant's uid: a 0700 project
    folder is unreadable to it, and the load error says so and how to fix it."""
    need_sandbox()
    if not probe().per_tenant_uids:
        pytest.skip("workers run as the server's own uid here (not root)")
    from support import KilnServer

    project = tmp_path / "private"
    write(project / "h.py", "class M:\n    def predict(self, payload):\n        return 1\n")
    write(project / "kiln.yaml", "- kind: api\n  name: private\n  python: {handler: h.py:M}\n")
    project.chmod(0o700)
    server = KilnServer(project, tmp_path / "home", ["--sandbox"])
    try:
        answer = server.client.post("/private", json=1)
        assert answer.status_code == 503, answer.text
        message = answer.json()["error"]["message"]
        assert "PermissionError" in message and "chmod -R o+rX" in message, message
    finally:
        server.stop()
