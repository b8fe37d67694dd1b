"""Keys and quotas exact through Ray Serve: 2 ingress replicas, 32 clients, one PostgreSQL.

The user and key are made in the shared store with the accounts API a `kiln server`
uses; the project is served by `build_app` with `store_url` (keys on) and 2
`KilnIngress` replicas behind Serve's HTTP proxy. Admission is decided in the store
(control/shared_quotas.py), so the two ingress processes together admit exactly the
key's quota, and the metered usage in the store says so.
"""

from __future__ import annotations

import concurrent.futures
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from ray_cluster import RayCluster  # the session fixture `ray_cluster` is in conftest.py

serve = pytest.importorskip("ray.serve")

PG_URL = os.environ.get("KILN_TEST_POSTGRES_URL")
QUOTA = 50
CLIENTS = 32
REQUESTS = 200

KILN_YAML = """
- kind: api
  name: echo
  python: {handler: model.py:Model}
  compute: {min_replicas: 1, max_replicas: 1, cpu: 200m}
"""

MODEL_PY = """
class Model:
    def predict(self, payload, context):
        return {"y": payload["x"] * 2}
"""


@pytest.fixture(scope="module")
def shared(ray_cluster: RayCluster, tmp_path_factory: pytest.TempPathFactory) -> Any:
    if not PG_URL:
        if os.environ.get("CI") == "true":
            pytest.fail("KILN_TEST_POSTGRES_URL is not set under CI=true")
        pytest.skip("KILN_TEST_POSTGRES_URL not set (an empty PostgreSQL this test may wipe)")
    from kiln.backends.ray.app import build_app
    from kiln.control.accounts import Accounts
    from kiln.control.store import Store

    engine = sa.create_engine(PG_URL)
    with engine.begin() as conn:
        conn.execute(sa.text("DROP SCHEMA public CASCADE"))
        conn.execute(sa.text("CREATE SCHEMA public"))
    engine.dispose()
    store = Store(PG_URL)
    accounts = Accounts(store)
    accounts.create_user("carol", plan="free")
    accounts.create_user("dave", plan="free")
    _, carol = accounts.create_key("carol", name="quota test", quota=QUOTA)
    _, dave = accounts.create_key("dave")
    root: Path = tmp_path_factory.mktemp("ray-quotas")
    (root / "kiln.yaml").write_text(KILN_YAML)
    (root / "model.py").write_text(MODEL_PY)
    app = build_app(
        {"project_dir": str(root), "store_url": PG_URL, "owner": "carol", "ingress_replicas": 2}
    )
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(serve.run, app, name="kiln-quotas", route_prefix="/").result(timeout=120)
    yield ray_cluster, store, {"carol": carol, "dave": dave}
    serve.delete("kiln-quotas")
    store.close()


def test_keys_and_quotas_exact_with_2_ingress_replicas_and_32_clients(shared: Any) -> None:
    cluster, store, keys = shared
    ingress = serve.status().applications["kiln-quotas"].deployments["KilnIngress"]
    assert ingress.replica_states.get("RUNNING") == 2, ingress.replica_states

    with httpx.Client(base_url=cluster.url, timeout=30) as http:
        assert http.post("/carol/echo", json={"x": 1}).status_code == 401  # no key
        bad = http.post("/carol/echo", json={"x": 1}, headers={"x-api-key": "kiln_0000_nope"})
        assert bad.status_code == 401, bad.text
        assert "not valid" in bad.json()["error"]["message"]
        other = http.post("/carol/echo", json={"x": 1}, headers={"x-api-key": keys["dave"]})
        assert other.status_code == 404, other.text  # another user's API: as if missing

    def one(i: int) -> tuple[int, str]:
        with httpx.Client(base_url=cluster.url, timeout=60) as http:
            r = http.post("/carol/echo", json={"x": i}, headers={"x-api-key": keys["carol"]})
        if r.status_code == 200:
            assert r.json() == {"y": 2 * i}
        return r.status_code, r.headers.get("x-ratelimit-remaining", "")

    with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
        outcomes = list(pool.map(one, range(REQUESTS), timeout=180))
    statuses = Counter(status for status, _ in outcomes)
    assert statuses == {200: QUOTA, 429: REQUESTS - QUOTA}, statuses
    remaining = sorted(int(left) for status, left in outcomes if status == 200)
    assert remaining == list(range(QUOTA))  # every admission had its own place in the quota

    # Metering reaches the store within a couple of the ingresses' 1 s flushes.
    key_id = next(k.id for k in store.list_keys("carol"))
    deadline = time.monotonic() + 15
    metered: dict[str, int] = {}
    while time.monotonic() < deadline:
        metered = Counter()
        for row in store.key_usage(user="carol"):
            metered[row.status_class] += row.count
            assert row.key_id == key_id and row.api == "carol.echo"
        if sum(metered.values()) >= QUOTA:
            break
        time.sleep(0.5)
    assert dict(metered) == {"2xx": QUOTA}  # refused calls are never metered
