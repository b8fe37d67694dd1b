"""Per-API per-minute history (issue 18): aggregation, pruning, and the REST route."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import numpy as np
import pytest
import sqlalchemy as sa
from support import KilnServer, build_linear_onnx, write

from kiln.control.metrics import LATENCY_BUCKETS
from kiln.control.store import MinuteDelta, Store, percentile_bucket
from kiln.control.timeseries import RETAIN_S, TimeSeries


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _served(ready: int, queued: int) -> Any:
    return SimpleNamespace(ready_slots=lambda: [object()] * ready, queue=[object()] * queued)


def _registry(**apis: tuple[int, int]) -> Any:
    groups = {name: SimpleNamespace(versions={"": _served(*sizes)}) for name, sizes in apis.items()}
    return SimpleNamespace(groups=groups)


PG_URL = os.environ.get("KILN_TEST_POSTGRES_URL")


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """A fresh store on SQLite, and on PostgreSQL when KILN_TEST_POSTGRES_URL is set."""
    url = f"sqlite:///{tmp_path / 'state.db'}"
    if request.param == "postgresql":
        if not PG_URL:
            pytest.skip("KILN_TEST_POSTGRES_URL not set (scripts/postgres-for-tests.sh)")
        engine = sa.create_engine(PG_URL)
        with engine.begin() as conn:
            conn.execute(sa.text("DROP SCHEMA public CASCADE"))
            conn.execute(sa.text("CREATE SCHEMA public"))
        engine.dispose()
        url = PG_URL
    with Store(url) as s:
        yield s


def test_minutes_add_up_across_flushes_and_keep_the_largest_queue(store: Store) -> None:
    store.add_minutes([MinuteDelta("a", 600, {"2xx": 3, "5xx": 1}, {2: 4}, replicas=1, queue=5)])
    store.add_minutes([MinuteDelta("a", 600, {"2xx": 2, "4xx": 1}, {2: 1, 9: 2}, 2, 3)])
    store.add_minutes([MinuteDelta("a", 660, {"2xx": 1}, {0: 1}), MinuteDelta("b", 600)])
    rows = store.minutes("a", 0)
    assert [r.minute for r in rows] == [600, 660]
    first = rows[0]
    assert first.classes == {"2xx": 5, "4xx": 1, "5xx": 1}
    assert first.latency == {2: 5, 9: 2}
    assert (first.replicas, first.queue) == (2, 5)  # last replicas sample, largest queue
    assert rows[1].replicas is None and rows[1].latency == {0: 1}
    with pytest.raises(ValueError, match="multiple of 60"):
        store.add_minutes([MinuteDelta("a", 601)])


def test_pruning_keeps_the_retention_and_bounds_the_table(store: Store) -> None:
    clock = Clock(100 * 86_400.0)
    series = TimeSeries(store, _registry(), LATENCY_BUCKETS, clock=clock)
    for minute in range(0, 30 * 3600, 60):  # 30 hours of traffic, one answer a minute
        clock.now = 100 * 86_400.0 + minute
        series.observe("a", 200, 0.003)
        series.flush()
    assert store.count_minutes() <= RETAIN_S // 60 + 2
    oldest = store.minutes("a", 0)[0].minute
    assert clock.now - oldest <= RETAIN_S + 60
    assert clock.now - oldest >= 24 * 3600  # at least 24 hours are kept


def test_points_have_one_minute_each_with_percentiles_from_the_buckets(store: Store) -> None:
    clock = Clock(50 * 86_400.0 + 30)
    series = TimeSeries(store, _registry(a=(2, 4)), LATENCY_BUCKETS, clock=clock)
    for _ in range(90):
        series.observe("a", 200, 0.004)  # bucket le=0.005
    for _ in range(9):
        series.observe("a", 404, 0.04)  # le=0.05
    series.observe("a", 503, 3.0)  # le=5.0
    series.sample()
    clock.now += 120  # two minutes later: nothing since
    answer = series.points("a", "15m")
    assert answer["step_s"] == 60 and len(answer["points"]) == 15
    ts = [p["t"] for p in answer["points"]]
    assert ts == sorted(ts) and all(b - a == 60 for a, b in zip(ts, ts[1:], strict=False))
    busy = answer["points"][-3]
    assert busy["t"] == 50 * 86_400
    assert (busy["2xx"], busy["4xx"], busy["5xx"]) == (90, 9, 1)
    assert (busy["p50_ms"], busy["p90_ms"], busy["p99_ms"]) == (5.0, 5.0, 50.0)
    assert (busy["replicas"], busy["queue"]) == (2, 4)
    quiet = answer["points"][-1]
    assert (quiet["2xx"], quiet["p50_ms"], quiet["replicas"]) == (0, None, None)
    assert len(series.points("a", "24h")["points"]) == 1440


def test_percentile_bucket_is_nearest_rank() -> None:
    assert percentile_bucket({}, 50) is None
    assert percentile_bucket({1: 1, 3: 1}, 50) == 1
    assert percentile_bucket({1: 1, 3: 1}, 51) == 3


def test_timeseries_route_matches_the_traffic_sent_and_is_documented(tmp_path: Path) -> None:
    build_linear_onnx(tmp_path / "m.onnx", np.eye(4, 2, dtype=np.float32))
    write(tmp_path / "kiln.yaml", "- kind: api\n  name: lin\n  onnx: {model: m.onnx}\n")
    server = KilnServer(tmp_path, tmp_path / "home")
    try:
        good = [server.client.post("/lin", json=[i, 0, 0, 0]) for i in range(12)]
        bad = [server.client.post("/lin", json=[1, 2]) for _ in range(3)]
        assert [r.status_code for r in good + bad] == [200] * 12 + [400] * 3
        mgmt = httpx.Client(base_url=server.management_url, timeout=30)
        answer = mgmt.get("/apis/lin/timeseries", params={"window": "15m"}).json()
        assert answer["step_s"] == 60 and len(answer["points"]) == 15
        points = answer["points"]
        assert sum(p["2xx"] for p in points) == 12
        assert sum(p["4xx"] for p in points) == 3
        assert sum(p["5xx"] for p in points) == 0
        busy = [p for p in points if p["2xx"] or p["4xx"]]
        assert busy and all(0 < p["p50_ms"] <= p["p90_ms"] <= p["p99_ms"] for p in busy)
        assert set(points[-1]) == {
            "t", "2xx", "4xx", "5xx", "p50_ms", "p90_ms", "p99_ms", "replicas", "queue"
        }  # fmt: skip
        wrong = mgmt.get("/apis/lin/timeseries", params={"window": "2h"})
        assert wrong.status_code == 400 and "15m, 1h, 24h" in wrong.json()["message"]
        missing = mgmt.get("/apis/nope/timeseries")
        assert missing.status_code == 404
        doc = mgmt.get("/openapi.json").json()
        operation = doc["paths"]["/apis/{name}/timeseries"]["get"]
        window = next(p for p in operation["parameters"] if p["name"] == "window")
        assert window["schema"]["enum"] == ["15m", "1h", "24h"]
        schema = operation["responses"]["200"]["content"]["application/json"]["schema"]
        assert "p99_ms" in schema["properties"]["points"]["items"]["properties"]
    finally:
        server.stop()


def test_a_failed_flush_keeps_its_counts_for_the_next(store: Store) -> None:
    clock = Clock(60 * 86_400.0)
    series = TimeSeries(store, _registry(a=(1, 3)), LATENCY_BUCKETS, clock=clock)
    real = store.add_minutes
    calls = {"n": 0}

    def flaky(deltas: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError("disk full")
        real(deltas)

    store.add_minutes = flaky  # type: ignore[method-assign]
    series.observe("a", 200, 0.01)
    series.sample()
    series.flush()  # fails: kept
    series.observe("a", 500, 0.01)
    series.flush()
    (row,) = store.minutes("a", 0)
    assert row.classes == {"2xx": 1, "4xx": 0, "5xx": 1}
    assert sum(row.latency.values()) == 2 and (row.replicas, row.queue) == (1, 3)
