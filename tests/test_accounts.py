"""Accounts, API keys, quotas and metering against a real `kiln server` (auth on by default),
over every protocol: native, TorchServe, KServe V1, V2 (tritonclient), streaming, management."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest
from daemon import Daemon
from support import build_linear_onnx, write

HANDLER = """
class Echo:
    def predict(self, payload, context):
        return {"owner": OWNER, "echo": payload}


class Stream:
    def predict(self, payload, context):
        yield "a"
        yield "b"
"""


def project(folder: Path, owner: str, names: tuple[str, ...] = ("sentiment",)) -> Path:
    write(folder / "h.py", f"OWNER = {owner!r}\n" + HANDLER)
    build_linear_onnx(folder / "lin.onnx", np.eye(2, 2, dtype=np.float32))
    config = "- kind: deployment\n  name: app\n"
    for name in names:
        config += f"- kind: api\n  name: {name}\n  python: {{handler: h.py:Echo}}\n"
    config += "- kind: api\n  name: tokens\n  python: {handler: h.py:Stream}\n"
    config += "  metadata: {streaming: true}\n"
    config += "- kind: api\n  name: lin\n  onnx: {model: lin.onnx}\n"
    write(folder / "kiln.yaml", config)
    return folder


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("accounts")
    d = Daemon(root / "home")
    d.start()
    keys = {"admin": d.admin_key}
    for user in ("alice", "bob"):
        made = d.kiln("users", "create", user, "-o", "json")
        assert made.returncode == 0, made.stderr
        keys[user] = orjson.loads(made.stdout)["key"]
        env = {**d.env, "KILN_API_KEY": keys[user]}
        deployed = d.kiln_env(env, "deploy", str(project(root / user, user)))
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    d.keys = keys
    yield d
    d.stop()
    # No key may be written anywhere in the server's logs.
    for path in (d.home / "logs").rglob("*"):
        if path.is_file():
            text = path.read_text(errors="replace")
            for key in keys.values():
                assert key not in text, f"an API key leaked into {path}"


def scrub(response: httpx.Response, name: str) -> str:
    """The body with the asked-for name and the request id blanked out."""
    return re.sub(r"[0-9a-f]{32}", "ID", response.text.replace(name, "X"))


def hdr(key: str, style: str = "x-api-key") -> dict[str, str]:
    return {"x-api-key": key} if style == "x-api-key" else {"Authorization": f"Bearer {key}"}


PROTOCOL_CALLS = [
    ("native", "POST", "/{user}/sentiment", {"json": "hi"}),
    ("torchserve", "POST", "/predictions/{user}.sentiment", {"json": "hi"}),
    ("kserve-v1", "POST", "/v1/models/{user}.sentiment:predict", {"json": {"instances": ["hi"]}}),
    (
        "v2",
        "POST",
        "/v2/models/{user}.lin/infer",
        {"json": {"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]}},
    ),
]


@pytest.mark.parametrize(
    "name,method,path,body", PROTOCOL_CALLS, ids=[c[0] for c in PROTOCOL_CALLS]
)
def test_every_protocol_needs_a_key_and_serves_with_one(
    platform: Daemon, name: str, method: str, path: str, body: dict
) -> None:
    url = platform.url + path.format(user="alice")
    missing = httpx.request(method, url, **body)
    assert missing.status_code == 401
    assert missing.headers["WWW-Authenticate"].startswith("Bearer")
    wrong = httpx.request(method, url, headers=hdr("kiln_00000000_nope"), **body)
    assert wrong.status_code == 401
    for style in ("x-api-key", "bearer"):
        ok = httpx.request(method, url, headers=hdr(platform.keys["alice"], style), **body)
        assert ok.status_code == 200, ok.text
        assert int(ok.headers["X-RateLimit-Remaining"]) < int(ok.headers["X-RateLimit-Limit"])
    if name == "torchserve":
        assert set(missing.json()) == {"code", "type", "message"}
    if name == "native":
        assert missing.json()["error"]["type"] == "Unauthorized"


def test_health_routes_stay_open_and_name_no_api(platform: Daemon) -> None:
    for path in ("/ping", "/healthz", "/v2/health/live", "/v2/health/ready"):
        response = httpx.get(platform.url + path)
        assert response.status_code == 200, path
        assert "sentiment" not in response.text and "alice" not in response.text
    assert httpx.get(platform.url + "/apis").status_code == 401
    assert httpx.get(platform.url + "/v2/repository/index", timeout=10).status_code in (401, 405)


def test_another_users_api_answers_exactly_like_a_missing_one(platform: Daemon) -> None:
    alice = hdr(platform.keys["alice"])
    for hidden, missing in (
        ("/bob/sentiment", "/nobody/sentiment"),
        ("/predictions/bob.sentiment", "/predictions/nobody.sentiment"),
        ("/v1/models/bob.sentiment:predict", "/v1/models/nobody.sentiment:predict"),
        ("/v2/models/bob.lin/infer", "/v2/models/nobody.lin/infer"),
    ):
        a = httpx.post(platform.url + hidden, json={"instances": [1]}, headers=alice)
        b = httpx.post(platform.url + missing, json={"instances": [1]}, headers=alice)
        assert a.status_code == b.status_code == 404, (hidden, a.text)
        assert scrub(a, "bob") == scrub(b, "nobody"), (a.text, b.text)
    mine = httpx.post(platform.url + "/alice/sentiment", json="x", headers=alice).json()
    assert mine["owner"] == "alice"
    listed = httpx.get(platform.url + "/apis", headers=alice).json()["apis"]
    assert {a["name"] for a in listed} == {"alice.sentiment", "alice.tokens", "alice.lin"}
    v2_index = httpx.post(platform.url + "/v2/repository/index", headers=alice, json={}).json()
    assert all(m["name"].startswith("alice.") for m in v2_index)
    # Management: listing, details, logs, delete, rollback.
    manage = platform.management_url
    apis = httpx.get(f"{manage}/apis", headers=alice).json()["apis"]
    assert {a["name"] for a in apis} == {"alice.sentiment", "alice.tokens", "alice.lin"}
    for method, path in (
        ("GET", "/apis/bob.sentiment"),
        ("GET", "/apis/bob.sentiment/logs"),
        ("DELETE", "/apis/bob.sentiment"),
        ("POST", "/apis/bob.sentiment/refresh"),
        ("GET", "/models/bob.sentiment"),
        ("GET", "/deployments/bob.app"),
    ):
        response = httpx.request(method, manage + path, headers=alice)
        assert response.status_code == 404, (path, response.text)
    models = httpx.get(f"{manage}/models", headers=alice).json()["models"]
    assert all(m["modelName"].startswith("alice.") for m in models)
    bob = httpx.post(platform.url + "/bob/sentiment", json="x", headers=hdr(platform.keys["bob"]))
    assert bob.json()["owner"] == "bob"


def test_key_lifecycle_disable_enable_expire_rotate_delete_scope(platform: Daemon) -> None:
    env = {**platform.env, "KILN_API_KEY": platform.keys["alice"]}
    made = platform.kiln_env(env, "keys", "create", "--name", "ci")
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    assert re.fullmatch(r"kiln_[0-9a-f]{8}_\S+", key), made.stdout
    key_id = key.split("_")[1]
    url = platform.url + "/alice/sentiment"
    assert httpx.post(url, json=1, headers=hdr(key)).status_code == 200

    assert platform.kiln_env(env, "keys", "disable", key_id).returncode == 0
    assert httpx.post(url, json=1, headers=hdr(key)).status_code == 403
    assert platform.kiln_env(env, "keys", "enable", key_id).returncode == 0
    assert httpx.post(url, json=1, headers=hdr(key)).status_code == 200

    rotated = platform.kiln_env(env, "keys", "rotate", key_id)
    new_key = rotated.stdout.strip()
    assert httpx.post(url, json=1, headers=hdr(key)).status_code == 401
    assert httpx.post(url, json=1, headers=hdr(new_key)).status_code == 200
    new_id = new_key.split("_")[1]
    assert platform.kiln_env(env, "keys", "delete", new_id).returncode == 0
    assert httpx.post(url, json=1, headers=hdr(new_key)).status_code == 401

    short = orjson.loads(
        platform.kiln_env(env, "keys", "create", "--expires", "1s", "-o", "json").stdout
    )
    assert set(short) >= {"key", "id"} and short["key"].startswith(f"kiln_{short['id']}_")
    time.sleep(1.2)
    assert httpx.post(url, json=1, headers=hdr(short["key"])).status_code == 403

    invoke_only = platform.kiln_env(env, "keys", "create").stdout.strip()
    refused = httpx.get(f"{platform.management_url}/apis", headers=hdr(invoke_only))
    assert refused.status_code == 403 and "manage" in refused.json()["message"]

    scoped = platform.kiln_env(env, "keys", "create", "--apis", "lin").stdout.strip()
    hidden = httpx.post(url, json=1, headers=hdr(scoped))
    missing = httpx.post(platform.url + "/alice/nothing", json=1, headers=hdr(scoped))
    assert hidden.status_code == missing.status_code == 404
    assert scrub(hidden, "sentiment") == scrub(missing, "nothing")

    listed = orjson.loads(platform.kiln_env(env, "keys", "list", "-o", "json").stdout)["keys"]
    assert all(k["user"] == "alice" for k in listed)
    assert all("hash" not in k and "key" not in k for k in listed)


def test_streaming_and_tritonclient_send_keys(platform: Daemon) -> None:
    key = platform.keys["alice"]
    with httpx.stream("POST", platform.url + "/predictions/alice.tokens", content=b"go") as r:
        assert r.status_code == 401
    with httpx.stream(
        "POST", platform.url + "/predictions/alice.tokens", content=b"go", headers=hdr(key)
    ) as r:
        assert r.status_code == 200 and b"".join(r.iter_raw()) == b"ab"

    tritonclient = pytest.importorskip("tritonclient.http")
    client = tritonclient.InferenceServerClient(url=platform.url.removeprefix("http://"))
    tensor = tritonclient.InferInput("x", [1, 2], "FP32")
    tensor.set_data_from_numpy(np.array([[3, 4]], dtype=np.float32))
    result = client.infer("alice.lin", [tensor], headers={"x-api-key": key})
    assert result.as_numpy("y").tolist() == [[3.0, 4.0]]
    with pytest.raises(Exception, match="401|API key"):
        client.infer("alice.lin", [tensor])
    client.close()


def test_exact_quota_under_32_concurrent_clients_and_rate_limits(platform: Daemon) -> None:
    env = {**platform.env, "KILN_API_KEY": platform.keys["bob"]}
    made = orjson.loads(
        platform.kiln_env(env, "keys", "create", "--quota", "50", "-o", "json").stdout
    )
    key, url = made["key"], platform.url + "/bob/sentiment"
    results: list[int] = []
    lock = threading.Lock()

    def hammer() -> None:
        with httpx.Client(headers=hdr(key), timeout=30) as c:
            while True:
                status = c.post(url, json=1).status_code
                with lock:
                    results.append(status)
                if status == 429:
                    return

    threads = [threading.Thread(target=hammer) for _ in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results.count(200) == 50, results.count(200)
    over = httpx.post(url, json=1, headers=hdr(key))
    assert over.status_code == 429 and "quota" in over.json()["error"]["message"]
    assert over.headers["X-RateLimit-Remaining"] == "0" and int(over.headers["Retry-After"]) > 0

    limited = orjson.loads(
        platform.kiln_env(env, "keys", "create", "--rate", "1", "--burst", "2", "-o", "json").stdout
    )["key"]
    statuses = [httpx.post(url, json=1, headers=hdr(limited)) for _ in range(3)]
    assert [s.status_code for s in statuses] == [200, 200, 429]
    assert "rate limit" in statuses[2].json()["error"]["message"]
    assert statuses[2].headers["Retry-After"] == "1" and "X-RateLimit-Reset" in statuses[2].headers


def test_usage_is_metered_per_key_and_exposed(platform: Daemon) -> None:
    env = {**platform.env, "KILN_API_KEY": platform.keys["alice"]}
    key = orjson.loads(platform.kiln_env(env, "keys", "create", "-o", "json").stdout)
    for _ in range(7):
        httpx.post(platform.url + "/alice/sentiment", json=1, headers=hdr(key["key"]))
    httpx.post(platform.url + "/alice/sentiment", content=b"{bad", headers=hdr(key["key"]))
    usage = orjson.loads(platform.kiln_env(env, "usage", "-o", "json").stdout)
    rows = [r for r in usage["usage"] if r["key_id"] == key["id"]]
    assert rows == [
        {
            "user": "alice",
            "key_id": key["id"],
            "api": "alice.sentiment",
            "version": None,
            "by_status": {"2xx": 7, "4xx": 1},
            "calls": 8,
        }
    ]
    assert all(r["user"] == "alice" for r in usage["usage"])
    refused = platform.kiln_env(env, "usage", "--user", "bob")
    assert refused.returncode == 1 and "your own usage" in refused.stderr
    # The metrics port needs a manage key; a user's shows that user's series only.
    metrics = httpx.get(platform.info["metrics_url"], headers=hdr(platform.keys["alice"])).text
    assert 'user="bob"' not in metrics
    assert (
        f'kiln_key_requests_total{{key_id="{key["id"]}",status_class="2xx",user="alice"}} 7.0'
        in metrics
    )
    assert key["key"] not in metrics


def test_free_plan_limits_apis_and_calls(platform: Daemon, tmp_path: Path) -> None:
    made = orjson.loads(platform.kiln("users", "create", "carol", "-o", "json").stdout)
    env = {**platform.env, "KILN_API_KEY": made["key"]}
    five = project(tmp_path / "five", "carol", ("a1", "a2"))  # + tokens, lin = 4 APIs
    assert platform.kiln_env(env, "deploy", str(five)).returncode == 0
    six = project(tmp_path / "six", "carol", ("a1", "a2", "a3", "a4"))  # the same deployment
    refused = platform.kiln_env(env, "deploy", str(six))
    assert refused.returncode == 1
    assert "'free' plan allows 5 APIs" in refused.stderr

    url = platform.url + "/carol/a1"
    with httpx.Client(headers=hdr(made["key"]), timeout=30) as c:
        statuses = [c.post(url, json=1).status_code for _ in range(1000)]
        assert statuses.count(200) == 1000
        over = c.post(url, json=1)
    assert over.status_code == 429
    assert "'free' plan's 1000 calls a month" in over.json()["error"]["message"]
    assert int(over.headers["X-RateLimit-Reset"]) > 0


def stored_calls(home: Path, key_id: str) -> int:
    db = sqlite3.connect(f"file:{home / 'state.db'}?mode=ro", uri=True, timeout=10)
    try:
        query = "SELECT SUM(count) FROM key_usage WHERE key_id = ?"
        return int(db.execute(query, (key_id,)).fetchone()[0] or 0)
    finally:
        db.close()


def test_counters_survive_a_sigkill(platform: Daemon) -> None:
    env = {**platform.env, "KILN_API_KEY": platform.keys["bob"]}
    key = orjson.loads(
        platform.kiln_env(env, "keys", "create", "--quota", "10", "-o", "json").stdout
    )
    for _ in range(4):
        assert (
            httpx.post(platform.url + "/bob/sentiment", json=1, headers=hdr(key["key"])).status_code
            == 200
        )
    # The server writes usage every second by itself; wait (reading the database, not the
    # API, whose read would flush) until those 4 calls are on disk, then kill it.
    platform.wait_until(lambda: stored_calls(platform.home, key["id"]) == 4, 15, "the 1 s flush")
    os.kill(platform.info["pid"], signal.SIGKILL)
    time.sleep(0.5)
    platform.start()
    after = httpx.post(platform.url + "/bob/sentiment", json=1, headers=hdr(key["key"]))
    assert after.status_code == 200 and after.headers["X-RateLimit-Remaining"] == "5"
    usage = orjson.loads(platform.kiln_env(env, "usage", "-o", "json").stdout)
    assert sum(r["calls"] for r in usage["usage"] if r["key_id"] == key["id"]) == 5


def test_kiln_serve_is_open_by_default_and_locked_with_auth(tmp_path: Path, serve_project) -> None:
    folder = project(tmp_path / "p", "dev")
    open_server = serve_project(folder)
    assert open_server.client.post("/app/sentiment", json=1).status_code == 200
    locked = serve_project(folder, "--auth")
    assert locked.client.post("/app/sentiment", json=1).status_code == 401
    key = (locked.state / "admin.key").read_text().strip()
    assert oct((locked.state / "admin.key").stat().st_mode & 0o777) == "0o600"
    answer = locked.client.post("/app/sentiment", json=1, headers=hdr(key))
    assert answer.status_code == 200 and answer.json()["owner"] == "dev"


def test_users_batch_jobs_cannot_read_or_write_local_paths(
    platform: Daemon, tmp_path: Path
) -> None:
    made = orjson.loads(platform.kiln("users", "create", "dave", "-o", "json").stdout)
    env = {**platform.env, "KILN_API_KEY": made["key"]}
    folder = tmp_path / "jobs"
    write(
        folder / "predictor.py",
        "class PythonPredictor:\n    def __init__(self, config, job_spec):\n        pass\n"
        "    def predict(self, payload, batch_id):\n        return payload\n",
    )
    write(
        folder / "kiln.yaml",
        "- kind: deployment\n  name: jobs\n"
        "- kind: BatchAPI\n  name: copy\n  predictor: {type: python, path: predictor.py}\n",
    )
    assert platform.kiln_env(env, "deploy", str(folder)).returncode == 0
    url = platform.url + "/dave/copy"
    local = {"workers": 1, "file_path_lister": {"paths": ["/etc"], "batch_size": 1}}
    refused = httpx.post(url, json=local, headers=hdr(made["key"]))
    assert refused.status_code == 403 and "local paths" in refused.json()["error"]["message"]
    items = {
        "workers": 1,
        "item_list": {"items": [1], "batch_size": 1},
        "output": {"path": "/tmp/x"},
    }
    absolute = httpx.post(url, json=items, headers=hdr(made["key"]))
    assert absolute.status_code == 400 and "output.path" in absolute.text
    # A relative output path is the job's own folder under KILN_HOME/jobs: allowed.
    own = httpx.post(url, json={**items, "output": {"path": "x"}}, headers=hdr(made["key"]))
    assert own.status_code == 200, own.text
    location = own.json()["output"]["location"]
    assert location.startswith(str((platform.home / "jobs").resolve())), location
    fine = httpx.post(url, json={**items, "output": None}, headers=hdr(made["key"]))
    assert fine.status_code == 200, fine.text
    hidden = httpx.post(url, json=items, headers=hdr(platform.keys["alice"]))
    assert hidden.status_code == 404
