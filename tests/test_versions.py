"""API versions: the default (marked, else highest), explicit versions, set-default at runtime."""

from __future__ import annotations

import threading

import httpx
import orjson
import pytest
from support import KilnServer, write

HANDLER = """
import os


class Model:
    def load(self, model_dir, config):
        self.version = config["version"]

    def predict(self, payload, context):
        return {"version": self.version, "context": context.version, "pid": os.getpid()}
"""


def entry(name: str, version: str, default: bool = False) -> str:
    mark = "\n  default: true" if default else ""
    return f"""
- kind: api
  name: {name}
  version: "{version}"{mark}
  python: {{handler: model.py:Model}}
  config: {{version: "{version}"}}
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("versions-project")
    write(root / "model.py", HANDLER)
    config = (
        entry("echo", "1")
        + entry("echo", "2")
        + entry("echo", "10")  # "10" > "2": versions order naturally
        + entry("pinned", "1", default=True)
        + entry("pinned", "2")
    )
    write(root / "kiln.yaml", config)
    srv = KilnServer(root, tmp_path_factory.mktemp("home"))
    srv.management = orjson.loads((srv.state / "server.json").read_bytes())["management_url"]
    yield srv
    srv.stop()


def version_of(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["version"]


def test_unversioned_routes_use_the_highest_version(server: KilnServer) -> None:
    client = server.client
    assert version_of(client.post("/echo", json={})) == "10"
    assert version_of(client.post("/predictions/echo", json={})) == "10"
    v1 = client.post("/v1/models/echo:predict", json={"instances": [{}]})
    assert v1.json()["predictions"][0]["version"] == "10"


def test_default_true_wins_over_the_highest(server: KilnServer) -> None:
    assert version_of(server.client.post("/pinned", json={})) == "1"
    assert version_of(server.client.post("/predictions/pinned", json={})) == "1"


def test_explicit_versions_on_native_and_torchserve_routes(server: KilnServer) -> None:
    client = server.client
    for version in ("1", "2", "10"):
        answer = client.post("/echo", params={"version": version}, json={})
        assert version_of(answer) == version
        assert answer.json()["context"] == version
        assert version_of(client.post(f"/predictions/echo/{version}", json={})) == version
    assert version_of(client.post("/pinned?version=2", json={})) == "2"


def test_unknown_version_is_404_naming_the_versions(server: KilnServer) -> None:
    response = server.client.post("/echo", params={"version": "7"}, json={})
    assert response.status_code == 404
    assert "versions: 1, 10, 2" in response.json()["error"]["message"]
    torchserve = server.client.post("/predictions/echo/7", json={})
    assert torchserve.status_code == 404
    assert set(torchserve.json()) == {"code", "type", "message"}


def test_each_version_has_its_own_workers(server: KilnServer) -> None:
    pids = {
        version: server.client.post("/echo", params={"version": version}, json={}).json()["pid"]
        for version in ("1", "2", "10")
    }
    assert len(set(pids.values())) == 3


def test_set_default_switches_every_protocol_without_a_failed_request(server: KilnServer) -> None:
    mgmt = httpx.Client(base_url=server.management, timeout=30)
    stop = threading.Event()
    seen: list[tuple[int, str | None]] = []

    def traffic() -> None:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            while not stop.is_set():
                for path in ("/echo", "/predictions/echo"):
                    response = client.post(path, json={})
                    ok = response.status_code == 200
                    seen.append((response.status_code, response.json()["version"] if ok else None))

    thread = threading.Thread(target=traffic)
    thread.start()
    try:
        for target in ("2", "1", "10", "2"):
            response = mgmt.put(f"/models/echo/{target}/set-default")
            assert response.status_code == 200, response.text
            assert target in response.json()["status"]
            # Once set-default has answered, every unversioned route gets the new default.
            assert version_of(server.client.post("/echo", json={})) == target
            assert version_of(server.client.post("/predictions/echo", json={})) == target
            v1 = server.client.post("/v1/models/echo:predict", json={"instances": [{}]})
            assert v1.json()["predictions"][0]["version"] == target
            while sum(1 for _, v in seen[-50:] if v == target) < 5:
                assert thread.is_alive()
                threading.Event().wait(0.01)
    finally:
        stop.set()
        thread.join(30)
    assert len(seen) >= 20  # at least 5 answers from each new default
    assert [status for status, _ in seen if status != 200] == []
    assert {version for _, version in seen} >= {"1", "2", "10"}
    # Explicit versions are untouched by the default.
    assert version_of(server.client.post("/echo?version=10", json={})) == "10"
    described = {d["modelVersion"]: d["isDefault"] for d in mgmt.get("/models/echo/all").json()}
    assert described == {"1": False, "2": True, "10": False}
    assert mgmt.get("/models/echo").json()[0]["modelVersion"] == "2"


def test_set_default_to_an_unknown_version_is_404(server: KilnServer) -> None:
    mgmt = httpx.Client(base_url=server.management, timeout=30)
    response = mgmt.put("/models/echo/9/set-default")
    assert response.status_code == 404
    body = response.json()
    assert body["code"] == 404 and "no version '9'" in body["message"]
    missing = mgmt.put("/models/nothing/1/set-default")
    assert missing.status_code == 404
    assert "nothing" in missing.json()["message"]


def test_request_counters_carry_the_version_that_answered(server: KilnServer) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    def counts() -> dict[tuple[str, str], float]:
        text = httpx.get(server.metrics_url, timeout=10).text
        out: dict[tuple[str, str], float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == "kiln_requests_total" and s.labels["api"] == "pinned":
                    key = (s.labels["version"], s.labels["status_class"])
                    out[key] = out.get(key, 0) + s.value
        return out

    before = counts()
    for _ in range(3):
        version_of(server.client.post("/pinned", params={"version": "2"}, json={}))
    version_of(server.client.post("/predictions/pinned/1", json={}))
    after = counts()
    assert after.get(("2", "2xx"), 0) - before.get(("2", "2xx"), 0) == 3
    assert after.get(("1", "2xx"), 0) - before.get(("1", "2xx"), 0) == 1
