"""What a key may do beyond calling an API, against a real `kiln server` (auth on by default):
keys no broader than the key that makes them, manage scope for model load/unload and the
metrics port, paths only for the admin, handler messages kept out of 500s, and refused
calls (429) never metered, before or after a restart."""

from __future__ import annotations

import os
import signal
import sqlite3
import time
from pathlib import Path

import httpx
import orjson
import pytest
from daemon import Daemon
from support import write

SECRET = "password=hunter2"
HANDLER = f"""
class Echo:
    def predict(self, payload, context):
        return {{"echo": payload}}


class Boom:
    def predict(self, payload, context):
        raise ValueError({SECRET!r})
"""
CONFIG = """
- kind: deployment
  name: app
- kind: api
  name: echo
  python: {handler: h.py:Echo}
- kind: api
  name: boom
  python: {handler: h.py:Boom}
- kind: api
  name: boom-open
  python: {handler: h.py:Boom}
  serving: {expose_errors: true}
"""


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("key-scopes")
    d = Daemon(root / "home")
    d.start()
    made = d.kiln("users", "create", "alice", "-o", "json")
    assert made.returncode == 0, made.stderr
    d.alice = orjson.loads(made.stdout)["key"]
    write(root / "alice" / "h.py", HANDLER)
    write(root / "alice" / "kiln.yaml", CONFIG)
    deployed = d.kiln_env(d.env | {"KILN_API_KEY": d.alice}, "deploy", str(root / "alice"))
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    yield d
    d.stop()


def hdr(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def make_key(d: Daemon, key: str, **body: object) -> httpx.Response:
    return httpx.post(f"{d.management_url}/keys", json=body, headers=hdr(key), timeout=30)


def test_a_key_only_makes_keys_no_broader_than_itself(platform: Daemon) -> None:
    d = platform
    made = make_key(d, d.alice, scope="manage", apis=["echo"], expires="1d", quota=100, rate=50)
    assert made.status_code == 201, made.text
    limited = made.json()["key"]

    # The finding: with no limits given, the new key had none of its maker's.
    unlimited = make_key(d, limited, scope="manage")
    assert unlimited.status_code == 403, unlimited.text
    message = unlimited.json()["message"]
    for what in ("APIs: every API", "expiry: none", "quota: none", "rate: none"):
        assert what in message, message

    broader = make_key(
        d, limited, apis=["echo", "boom"], expires="2d", quota=1000, rate=50, burst=50
    )
    assert broader.status_code == 403
    message = broader.json()["message"]
    assert "alice.boom" in message and "expiry" in message and "quota: 1000" in message
    assert "burst" not in message  # the maker's burst is 50: not broader

    narrower = make_key(d, limited, apis=["echo"], expires="1h", quota=10, rate=5)
    assert narrower.status_code == 201, narrower.text
    assert narrower.json()["apis"] == ["alice.echo"] and narrower.json()["quota"] == 10

    # Nor through rotate (a new secret with the broad key's settings) or the CLI.
    keys = httpx.get(f"{d.management_url}/keys", headers=hdr(d.alice)).json()["keys"]
    first = next(k["id"] for k in keys if k["name"] == "first key")
    rotated = httpx.post(f"{d.management_url}/keys/{first}/rotate", headers=hdr(limited))
    assert rotated.status_code == 403 and "cannot rotate" in rotated.json()["message"]
    cli = d.kiln_env(d.env | {"KILN_API_KEY": limited}, "keys", "create", "--apis", "boom")
    assert cli.returncode == 1 and "broader" in cli.stderr, cli.stdout + cli.stderr

    # An admin key with limits makes no user (whose first key would have none).
    admin_limited = make_key(d, d.admin_key, scope="manage", apis=["alice.echo"]).json()["key"]
    user = httpx.post(
        f"{d.management_url}/users", json={"name": "mallory"}, headers=hdr(admin_limited)
    )
    assert user.status_code == 403 and "every API" in user.json()["message"]


def test_broader_than_names_every_setting_past_the_makers_bound() -> None:
    from kiln.control.accounts import KeyRecord, broader_than

    maker = KeyRecord(
        "k1", "alice", "", "h", frozenset({"invoke"}), frozenset({"alice.a", "alice.b"}),
        expires_at=1000.0, quota=10, rate=2.0, burst=4,
    )  # fmt: skip
    same = {
        "scopes": frozenset({"invoke"}), "apis": frozenset({"alice.a"}), "expires_at": 999.0,
        "quota": 10, "rate": 1.0, "burst": 4,
    }  # fmt: skip
    assert broader_than(maker, **same) == []
    assert broader_than(None, scopes=frozenset({"manage"})) == []  # the server itself
    wider = broader_than(
        maker, scopes=frozenset({"invoke", "manage"}), apis=None, expires_at=None,
        quota=11, rate=None, burst=5,
    )  # fmt: skip
    assert [w.split(" ")[0] for w in wider] == [
        "scope", "APIs:", "expiry:", "quota:", "rate:", "burst:",
    ]  # fmt: skip
    assert "scope manage" in wider[0] and "every API" in wider[1] and "--rate" in wider[4]
    manage = KeyRecord("k2", "alice", "", "h", frozenset({"invoke", "manage"}), None)
    assert broader_than(manage, scopes=frozenset({"invoke"}), apis=None) == []


def test_an_invoke_key_cannot_load_or_unload_models(platform: Daemon) -> None:
    d = platform
    invoke = make_key(d, d.alice).json()["key"]
    for action in ("unload", "load"):
        refused = httpx.post(
            f"{d.url}/v2/repository/models/alice.echo/{action}", json={}, headers=hdr(invoke)
        )
        assert refused.status_code == 403, refused.text
        assert "manage" in refused.json()["error"]
    index = httpx.post(f"{d.url}/v2/repository/index", json={}, headers=hdr(invoke))
    assert index.status_code == 403
    # The model was never unloaded; a manage key may use the repository extension.
    assert httpx.post(f"{d.url}/alice/echo", json=1, headers=hdr(invoke)).status_code == 200
    loaded = httpx.post(
        f"{d.url}/v2/repository/models/alice.echo/load", json={}, headers=hdr(d.alice)
    )
    assert loaded.status_code == 200, loaded.text
    states = httpx.post(f"{d.url}/v2/repository/index", json={}, headers=hdr(d.alice)).json()
    assert {s["name"]: s["state"] for s in states}["alice.echo"] == "READY"


def test_the_metrics_port_needs_a_manage_key(platform: Daemon) -> None:
    d = platform
    url = d.info["metrics_url"]
    # Traffic from two users, so there is someone else's series to keep from alice.
    assert httpx.post(f"{d.url}/alice/echo", json=1, headers=hdr(d.alice)).status_code == 200
    assert httpx.post(f"{d.url}/alice/echo", json=1, headers=hdr(d.admin_key)).status_code == 200

    missing = httpx.get(url)
    assert missing.status_code == 401 and missing.headers["WWW-Authenticate"].startswith("Bearer")
    invoke = make_key(d, d.alice).json()["key"]
    assert httpx.get(url, headers=hdr(invoke)).status_code == 403

    admin = httpx.get(url, headers=hdr(d.admin_key))  # Prometheus: a bearer token
    assert admin.status_code == 200
    assert 'user="admin"' in admin.text and 'user="alice"' in admin.text

    alice = httpx.get(url, headers={"x-api-key": d.alice})
    assert alice.status_code == 200 and 'api="alice.echo"' in alice.text
    assert 'user="alice"' in alice.text and 'user="admin"' not in alice.text
    for line in alice.text.splitlines():
        if 'api="' in line:
            assert 'api="alice.' in line, line


def test_get_server_shows_paths_to_the_admin_only(platform: Daemon) -> None:
    d = platform
    admin = httpx.get(f"{d.management_url}/server", headers=hdr(d.admin_key)).json()
    assert admin["home"] == str(d.home)
    user = httpx.get(f"{d.management_url}/server", headers=hdr(d.alice))
    assert user.status_code == 200 and "home" not in user.json()
    assert str(d.home) not in user.text and user.json()["mode"] == "server"


def test_a_handler_exception_message_stays_in_the_log(platform: Daemon) -> None:
    d = platform
    native = httpx.post(f"{d.url}/alice/boom", json=1, headers=hdr(d.alice))
    assert native.status_code == 500
    body = native.json()
    request_id = native.headers["x-request-id"]
    assert body["request_id"] == request_id and body["error"]["type"] == "InferenceError"
    assert "ValueError" in body["error"]["message"] and request_id in body["error"]["message"]
    assert "hunter2" not in native.text

    torchserve = httpx.post(f"{d.url}/predictions/alice.boom", json=1, headers=hdr(d.alice))
    assert torchserve.status_code == 500 and "hunter2" not in torchserve.text
    assert "ValueError" in torchserve.json()["message"]

    # `serving.expose_errors: true`: the API's owner chose to send messages.
    shown = httpx.post(f"{d.url}/alice/boom-open", json=1, headers=hdr(d.alice))
    assert shown.status_code == 500
    assert shown.json()["error"]["message"] == f"ValueError: {SECRET}"

    def logged() -> bool:
        out = d.kiln_env(d.env | {"KILN_API_KEY": d.alice}, "logs", "alice.boom", timeout=60)
        return out.returncode == 0 and SECRET in out.stdout and request_id in out.stdout

    d.wait_until(logged, 20, "the handler's message in `kiln logs`")


def stored(home: Path, key_id: str) -> dict[str, int]:
    db = sqlite3.connect(f"file:{home / 'state.db'}?mode=ro", uri=True, timeout=10)
    try:
        query = "SELECT status_class, SUM(count) FROM key_usage WHERE key_id = ? GROUP BY 1"
        return {c: int(n) for c, n in db.execute(query, (key_id,))}
    finally:
        db.close()


def test_refused_calls_are_never_metered_nor_counted_after_a_restart(platform: Daemon) -> None:
    d = platform
    env = d.env | {"KILN_API_KEY": d.alice}
    url = f"{d.url}/alice/echo"
    rated = make_key(d, d.alice, quota=10, rate=0.2, burst=2).json()
    quota = make_key(d, d.alice, quota=2).json()
    rate_statuses = [httpx.post(url, json=1, headers=hdr(rated["key"])) for _ in range(6)]
    assert [r.status_code for r in rate_statuses] == [200, 200, 429, 429, 429, 429]
    assert rate_statuses[1].headers["X-RateLimit-Remaining"] == "8"
    quota_statuses = [
        httpx.post(url, json=1, headers=hdr(quota["key"])).status_code for _ in "abcd"
    ]
    assert quota_statuses == [200, 200, 429, 429]

    usage = orjson.loads(d.kiln_env(env, "usage", "-o", "json").stdout)["usage"]  # flushes
    by_key = {r["key_id"]: r["by_status"] for r in usage}
    assert by_key[rated["id"]] == {"2xx": 2} and by_key[quota["id"]] == {"2xx": 2}
    assert stored(d.home, rated["id"]) == {"2xx": 2}

    # The quota counters are rebuilt from the usage rows: the 429s must not come back.
    os.kill(d.info["pid"], signal.SIGKILL)
    time.sleep(0.5)
    d.start()  # (token buckets live in memory: the rate limit starts afresh)
    url = f"{d.url}/alice/echo"  # a new port
    after = httpx.post(url, json=1, headers=hdr(rated["key"]))
    assert after.status_code == 200, after.text
    assert after.headers["X-RateLimit-Remaining"] == "7"  # 10 - 2 before - this one
    still = httpx.post(url, json=1, headers=hdr(quota["key"]))
    assert still.status_code == 429 and still.headers["X-RateLimit-Remaining"] == "0"
    usage = orjson.loads(d.kiln_env(env, "usage", "-o", "json").stdout)["usage"]
    by_key = {r["key_id"]: r["by_status"] for r in usage}
    assert by_key[rated["id"]] == {"2xx": 3} and by_key[quota["id"]] == {"2xx": 2}
