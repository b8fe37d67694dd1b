"""Traffic splitting and shadowing between an API's versions (issue 19, part 3).

Unit tests for the chooser (seeded: 2,000 draws within 3 points of the weights;
sticky header values always on one version) and for kiln.yaml's checks; then one
`kiln server` with a project whose Python handlers answer their version: splits on
the native route and on KServe V1, a shadow version whose answers never come back
but are counted, `kiln traffic` and PUT /apis/{name}/traffic surviving a restart,
TorchServe's set-default resetting the split, and `kind: TrafficSplitter`.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from daemon import Daemon
from support import write

from kiln.config import ConfigError, load_project
from kiln.control.store import Store
from kiln.serving.router import ApiGroup
from kiln.serving.traffic import Routing, sticky_point

DRAWS = 2000
TOLERANCE = 3.0  # percentage points


def shares(versions: list[str]) -> dict[str, float]:
    counts = Counter(versions)
    return {v: 100.0 * n / len(versions) for v, n in counts.items()}


def assert_split(versions: list[str], expected: dict[str, float]) -> None:
    got = shares(versions)
    for version, percent in expected.items():
        assert abs(got.get(version, 0.0) - percent) <= TOLERANCE, (got, expected)
    assert set(got) <= {v for v, p in expected.items() if p > 0}, got


# ----- the chooser ----------------------------------------------------------------------
def test_seeded_draws_follow_the_weights() -> None:
    routing = Routing({"1": 90, "2": 10}, rng=random.Random(7))
    assert_split([routing.choose() for _ in range(DRAWS)], {"1": 90, "2": 10})
    # Any positive total: 3/1 is 75/25; a zero weight never gets a request.
    routing = Routing({"a": 3, "b": 1, "c": 0}, rng=random.Random(8))
    assert_split([routing.choose() for _ in range(DRAWS)], {"a": 75, "b": 25})
    assert routing.describe()["percent"] == {"a": 75.0, "b": 25.0, "c": 0.0}


def test_sticky_header_keeps_a_value_on_one_version() -> None:
    routing = Routing({"1": 50, "2": 50}, sticky_header="X-User", rng=random.Random(1))
    for user in ("alice", "bob", "carol", "dave"):
        seen = {routing.choose({"x-user": user}) for _ in range(50)}
        assert len(seen) == 1, (user, seen)
    # Stable across processes (no salted hash): the point of a value is fixed.
    assert sticky_point("alice") == sticky_point("alice")
    assert 0.0 <= sticky_point("alice") < 1.0
    # Many users still split by the weights; requests without the header draw at random.
    users = [routing.choose({"x-user": f"user-{i}"}) for i in range(DRAWS)]
    assert_split([u for u in users if u], {"1": 50, "2": 50})
    assert_split([routing.choose({}) for _ in range(DRAWS)], {"1": 50, "2": 50})


class _Api:
    def __init__(self, version: str, **traffic: Any) -> None:
        self.version = version
        self.default = None
        self.traffic = traffic.get("traffic")
        self.shadow = traffic.get("shadow")
        self.traffic_sticky_header = traffic.get("sticky")


class _Served:
    """What ApiGroup reads of a served version: its name, version and spec."""

    def __init__(self, version: str, **traffic: Any) -> None:
        self.name = "m"
        self.version = version
        self.api = _Api(version, **traffic)


def group_of(*served: _Served) -> ApiGroup:
    group = ApiGroup("m", "/m")
    group.rng = random.Random(3)
    for s in served:
        group.versions[s.version] = s  # type: ignore[assignment]
    group.refresh_traffic()
    return group


def test_runtime_split_falls_back_to_kiln_yaml_when_a_version_is_gone() -> None:
    group = group_of(_Served("1", traffic={"1": 90, "2": 10}), _Served("2"), _Served("3"))
    assert group.traffic()["source"] == "kiln.yaml"  # type: ignore[index]
    assert group.default_version == "1"  # the split's lead
    group.set_traffic({"2": 50, "3": 50})
    assert_split([group.route(None).version for _ in range(DRAWS)], {"2": 50, "3": 50})
    assert group.route("1").version == "1"  # a versioned request is never split
    del group.versions["3"]  # a redeploy dropped version 3
    group.refresh_traffic()
    assert group.traffic()["source"] == "kiln.yaml"  # type: ignore[index]
    assert "3" in (group.traffic_note or "")
    assert_split([group.route(None).version for _ in range(DRAWS)], {"1": 90, "2": 10})
    # set-default: 100% on one version, kept as the runtime split.
    group.set_default("2")
    assert group.override == {"2": 100}
    assert {group.route(None).version for _ in range(100)} == {"2"}


def test_no_split_is_the_default_and_no_routing() -> None:
    group = group_of(_Served("1"), _Served("2"))
    assert group.routing is None and group.traffic() is None
    assert {group.route(None).version for _ in range(20)} == {"2"}


def test_store_keeps_the_runtime_split(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'state.db'}")
    assert store.get_traffic("m") is None
    store.set_traffic("m", {"1": 50, "2": 50})
    assert store.get_traffic("m") == {"1": 50, "2": 50}
    store.set_traffic("m", None)
    assert store.get_traffic("m") is None
    store.close()


# ----- kiln.yaml ------------------------------------------------------------------------
def entry(version: str, extra: str = "") -> str:
    return f"""
- kind: api
  name: m
  version: "{version}"
  python: {{handler: h.py}}
{extra}"""


def load_error(tmp_path: Path, config: str) -> str:
    write(tmp_path / "h.py", "def predict(payload, context):\n    return 1\n")
    write(tmp_path / "kiln.yaml", config)
    with pytest.raises(ConfigError) as info:
        load_project(tmp_path)
    return str(info.value)


def test_traffic_on_two_entries_names_both_and_the_fix(tmp_path: Path) -> None:
    config = entry("1", '  traffic: {"1": 90, "2": 10}') + entry("2", '  traffic: {"1": 50}')
    message = load_error(tmp_path, config)
    assert "kiln.yaml:" in message
    assert "traffic: is set on two entries of 'm' (version 1 at line" in message
    assert "version 2 here" in message
    assert "keep traffic: on one entry of 'm' only" in message


@pytest.mark.parametrize(
    ("traffic", "words"),
    [
        ('{"1": 90, "7": 10}', "names version '7', which 'm' does not have (versions: 1, 2)"),
        ('{"1": -1, "2": 10}', "weights are whole numbers >= 0"),
        ('{"1": 0.5, "2": 10}', "weights are whole numbers >= 0"),
        ('{"1": 0, "2": 0}', "add up to 0"),
    ],
)
def test_bad_weights_are_config_errors(tmp_path: Path, traffic: str, words: str) -> None:
    message = load_error(tmp_path, entry("1", f"  traffic: {traffic}") + entry("2"))
    assert words in message


def test_shadow_and_sticky_header_are_checked(tmp_path: Path) -> None:
    shadow = load_error(tmp_path, entry("1", '  shadow: {version: "9"}') + entry("2"))
    assert "shadow version '9' is not a version of 'm'" in shadow
    sticky = load_error(tmp_path, entry("1", "  traffic_sticky_header: X-User") + entry("2"))
    assert "traffic_sticky_header without a traffic: split" in sticky


def test_traffic_splitter_maps_onto_the_versions(tmp_path: Path) -> None:
    write(tmp_path / "h.py", "def predict(payload, context):\n    return 1\n")
    splitter = """
- kind: TrafficSplitter
  name: m
  networking: {endpoint: /canary}
  apis:
    - {name: "1", weight: 30}
    - {name: "m:2", weight: 70}
    - {name: "3", shadow: true}
"""
    write(tmp_path / "kiln.yaml", entry("1") + entry("2") + entry("3") + splitter)
    project = load_project(tmp_path)
    first = project.api("m", "1")
    assert first is not None and first.traffic == {"1": 30, "2": 70}
    assert first.shadow is not None and first.shadow.version == "3"
    assert {a.endpoint for a in project.apis} == {"/canary"}
    both = load_error(tmp_path, entry("1", '  traffic: {"1": 1}') + entry("2") + splitter)
    assert "'m' has a TrafficSplitter" in both and "remove traffic: here" in both
    unknown = splitter.replace('"m:2"', '"5"')
    message = load_error(tmp_path, entry("1") + entry("2") + entry("3") + unknown)
    assert "'5' is not a version of API 'm'" in message


# ----- a real server --------------------------------------------------------------------
HANDLER = """
VERSION = "{version}"


def predict(payload, context):
    return {{"version": VERSION}}
"""


def api(name: str, version: str, extra: str = "") -> str:
    return f"""
- kind: api
  name: {name}
  version: "{version}"
  python: {{handler: v{version}.py}}
{extra}"""


CONFIG = (
    api(
        "m",
        "1",
        '  traffic: {"1": 90, "2": 10}\n'
        '  shadow: {version: "3", percent: 50}\n'
        "  traffic_sticky_header: X-User",
    )
    + api("m", "2")
    + api("m", "3")
    + api("s", "1")
    + api("s", "2")
    + """
- kind: TrafficSplitter
  name: s
  apis: [{name: "1", weight: 30}, {name: "2", weight: 70}]
"""
)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("traffic")
    project = root / "project"
    for version in ("1", "2", "3"):
        write(project / f"v{version}.py", HANDLER.format(version=version))
    write(project / "kiln.yaml", CONFIG)
    d = Daemon(root / "home")
    d.start()
    done = d.kiln("deploy", str(project), "--name", "canary")
    assert done.returncode == 0, done.stdout + done.stderr
    yield d
    d.stop()


def many(d: Daemon, method: str, path: str, count: int = DRAWS, **kwargs: Any) -> list[Any]:
    """`count` requests on 16 threads (one client each); every answer's JSON."""
    url = d.url + path

    def batch(n: int) -> list[Any]:
        with httpx.Client(headers=d.auth, timeout=30) as client:
            out = []
            for _ in range(n):
                response = client.request(method, url, **kwargs)
                assert response.status_code == 200, response.text
                out.append(response.json())
            return out

    with ThreadPoolExecutor(16) as pool:
        parts = pool.map(batch, [count // 16 + (1 if i < count % 16 else 0) for i in range(16)])
        return [answer for part in parts for answer in part]


def native_versions(d: Daemon, count: int = DRAWS, **kwargs: Any) -> list[str]:
    return [a["version"] for a in many(d, "POST", "/m", count, json={}, **kwargs)]


def traffic(d: Daemon, name: str = "m") -> dict[str, Any]:
    response = d.http.get(f"{d.management_url}/apis/{name}/traffic")
    assert response.status_code == 200, response.text
    return response.json()


def shadow_count(d: Daemon) -> float:
    metrics = d.http.get(d.info["metrics_url"]).text
    found = re.search(
        r'^kiln_shadow_requests_total\{api="m",status="200",version="3"\} (\S+)$', metrics, re.M
    ) or re.search(
        r'^kiln_shadow_requests_total\{api="m",version="3",status="200"\} (\S+)$', metrics, re.M
    )
    return float(found.group(1)) if found else 0.0


def test_kiln_yaml_split_on_native_and_v1_and_shadow_never_answers(daemon: Daemon) -> None:
    d = daemon
    d.wait_until(lambda: all(a["status"] == "live" for a in d.apis().values()), what="live")
    before = shadow_count(d)
    versions = native_versions(d)
    assert "3" not in versions  # the shadow's answers are never returned
    assert_split(versions, {"1": 90, "2": 10})
    # Half the unversioned requests were mirrored to version 3, and answered there.
    d.wait_until(lambda: shadow_count(d) - before >= DRAWS * 0.4, what="shadow copies")
    assert shadow_count(d) - before <= DRAWS * 0.6
    # KServe V1 on the TrafficSplitter's API: the same choice, another protocol.
    answers = many(d, "POST", "/v1/models/s:predict", json={"instances": [{}]})
    assert_split([a["predictions"][0]["version"] for a in answers], {"1": 30, "2": 70})
    # A versioned route always gets its version.
    pinned = many(d, "POST", "/predictions/m/2", count=64, json={})
    assert {a["version"] for a in pinned} == {"2"}
    # The sticky header keeps one client on one version.
    for user in ("alice", "bob", "carol"):
        seen = set(native_versions(d, count=32, headers={"X-User": user}))
        assert len(seen) == 1, (user, seen)


def test_kiln_get_shows_the_split(daemon: Daemon) -> None:
    view = traffic(daemon)
    assert view["traffic"]["weights"] == {"1": 90, "2": 10}
    assert view["traffic"]["shadow"] == {"version": "3", "percent": 50.0}
    assert view["traffic"]["sticky_header"] == "x-user"
    shown = daemon.kiln("get", "m")
    assert shown.returncode == 0, shown.stderr
    assert "traffic split (kiln.yaml)" in shown.stdout
    assert "version 1  90%" in shown.stdout and "mirrored to version 3" in shown.stdout


def test_kiln_traffic_and_put_change_the_split_and_survive_a_restart(daemon: Daemon) -> None:
    d = daemon
    done = d.kiln("traffic", "m", "1=50", "2=50")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "runtime (kiln traffic)" in done.stdout and "version 2  50%" in done.stdout
    assert_split(native_versions(d), {"1": 50, "2": 50})
    bad = d.kiln("traffic", "m", "1=50", "9=50")
    assert bad.returncode != 0 and "no version 9" in bad.stdout + bad.stderr
    put = d.http.put(f"{d.management_url}/apis/m/traffic", json={"1": 20, "2": 80})
    assert put.status_code == 200, put.text
    assert put.json()["traffic"]["percent"] == {"1": 20.0, "2": 80.0}
    refused = d.http.put(f"{d.management_url}/apis/m/traffic", json={"1": -5})
    assert refused.status_code == 400 and "negative" in refused.json()["message"]

    d.stop()
    d.start()
    d.wait_until(lambda: all(a["status"] == "live" for a in d.apis().values()), what="live")
    view = traffic(d)
    assert view["traffic"]["source"] == "runtime"
    assert view["traffic"]["weights"] == {"1": 20, "2": 80}
    assert_split(native_versions(d), {"1": 20, "2": 80})


def test_set_default_resets_the_split_to_one_version(daemon: Daemon) -> None:
    d = daemon
    done = d.http.put(f"{d.management_url}/models/m/2/set-default")
    assert done.status_code == 200, done.text
    assert traffic(d)["traffic"]["weights"] == {"2": 100}
    assert set(native_versions(d, count=200)) == {"2"}
    reset = d.kiln("traffic", "m", "--reset")
    assert reset.returncode == 0, reset.stderr
    assert traffic(d)["traffic"]["source"] == "kiln.yaml"


def test_another_users_key_can_neither_read_nor_change_the_split(daemon: Daemon) -> None:
    d = daemon
    made = d.kiln("users", "create", "mallory", "-o", "json")
    assert made.returncode == 0, made.stderr
    key = {"Authorization": f"Bearer {orjson.loads(made.stdout)['key']}"}
    before = traffic(d)["traffic"]
    url = f"{d.management_url}/apis/m/traffic"
    for response in (
        httpx.get(url, headers=key, timeout=30),
        httpx.put(url, json={"1": 100}, headers=key, timeout=30),
        httpx.delete(url, headers=key, timeout=30),
    ):
        # Another user's API answers like a missing one, on every method.
        assert response.status_code == 404, response.text
        assert "canary" not in response.text and "version" not in response.text.lower()
    assert traffic(d)["traffic"] == before
