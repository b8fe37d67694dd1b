"""The state store: migrations, round trips, exact concurrent counting, crash safety.

Runs against SQLite files in tmp_path; set KILN_TEST_POSTGRES_URL (an empty database
this suite may wipe) to run the portable tests against PostgreSQL too.
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from kiln.control.store import (
    MIGRATIONS,
    TRACKER_BUCKET_S,
    USAGE_PERIOD_S,
    ApiSpec,
    Migration,
    NotFoundError,
    SchemaTooNewError,
    Store,
    StoreError,
    UsageIncrement,
    current_version,
    default_url,
    histogram,
    latest_version,
    schema,
    status_class,
)

PG_URL = os.environ.get("KILN_TEST_POSTGRES_URL")
T0 = 1_700_000_040.0  # a fixed instant, a whole multiple of the bucket sizes below
assert T0 % TRACKER_BUCKET_S == 0 and T0 % USAGE_PERIOD_S != 0


def _wipe_postgres(url: str) -> None:
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("DROP SCHEMA public CASCADE"))
        conn.execute(sa.text("CREATE SCHEMA public"))
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database URL for each test."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state.db'}"
    if not PG_URL:
        pytest.skip("KILN_TEST_POSTGRES_URL not set")
    _wipe_postgres(PG_URL)
    return PG_URL


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'state.db'}"


@pytest.fixture
def store(url: str):
    with Store(url) as s:
        yield s


def _jobs_step(conn: sa.Connection) -> None:
    md = sa.MetaData()
    sa.Table(
        "jobs",
        md,
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("api", sa.String(128), nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
    )
    md.create_all(conn)


WITH_JOBS = (*MIGRATIONS, Migration(len(MIGRATIONS) + 1, "batch jobs (test)", _jobs_step))


# ---- schema and migrations ------------------------------------------------------


def test_migrates_empty_database_to_the_live_schema(url: str) -> None:
    with Store(url) as s:
        assert s.schema_version == latest_version() == len(MIGRATIONS)
        engine = sa.create_engine(url)
        inspector = sa.inspect(engine)
        for name, table in schema.metadata.tables.items():
            reflected = {c["name"] for c in inspector.get_columns(name)}
            assert reflected == set(table.c.keys()), name
            pk = set(inspector.get_pk_constraint(name)["constrained_columns"])
            assert pk == {c.name for c in table.primary_key.columns}, name
        engine.dispose()
        assert current_version(s._engine) == latest_version()


def test_sqlite_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KILN_STATE_URL", raising=False)
    monkeypatch.setenv("KILN_HOME", str(tmp_path / "home"))
    assert default_url() == f"sqlite:///{tmp_path / 'home' / 'state.db'}"
    with Store() as s:
        s.add_usage("iris", "2xx")
        with s._read() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30_000
    assert (tmp_path / "home" / "state.db").stat().st_mode & 0o777 == 0o600
    with pytest.raises(ValueError, match="in-memory"):
        Store("sqlite://")
    with pytest.raises(ValueError, match="unsupported"):
        Store("mysql://localhost/kiln")


def test_reopen_keeps_data(url: str) -> None:
    with Store(url) as s:
        s.add_revision("shop", "h1", config_text="- kind: api", artifact_path="/a", apis=[])
        s.set_current_revision("shop", "h1")
        s.add_usage("iris", "2xx", 3, at=T0)
    with Store(url) as s:
        assert s.get_deployment("shop").current_revision == "h1"
        assert s.usage_totals("iris") == {"2xx": 3}
        assert s.schema_version == latest_version()


def test_new_migration_step_upgrades_and_keeps_data(url: str) -> None:
    with Store(url) as s:
        s.add_usage("iris", "2xx", 2, at=T0)
    with Store(url, migrations=WITH_JOBS) as s:
        assert s.schema_version == len(WITH_JOBS)
        assert s.usage_totals("iris") == {"2xx": 2}
        with s._write() as conn:
            conn.execute(sa.text("INSERT INTO jobs (id, api, status) VALUES ('j1', 'a', 'ok')"))
        with s._read() as conn:
            steps = conn.execute(sa.text("SELECT version, description FROM schema_version"))
            assert [v for v, _ in steps.all()] == list(range(1, len(WITH_JOBS) + 1))
    with Store(url, migrations=WITH_JOBS) as s:  # reopening at the newest version is a no-op
        assert s.schema_version == len(WITH_JOBS)


def test_refuses_a_schema_newer_than_the_code(url: str) -> None:
    Store(url, migrations=WITH_JOBS).close()
    with pytest.raises(SchemaTooNewError) as err:
        Store(url)
    message = str(err.value)
    assert f"schema version {len(WITH_JOBS)}" in message
    assert f"up to {len(MIGRATIONS)}" in message and "newer Kiln" in message
    engine = sa.create_engine(url)
    assert current_version(engine) == len(WITH_JOBS)  # left untouched
    engine.dispose()


def test_failing_migration_rolls_back_entirely(url: str) -> None:
    Store(url).close()

    def broken(conn: sa.Connection) -> None:
        _jobs_step(conn)
        raise RuntimeError("step failed halfway")

    with pytest.raises(RuntimeError, match="halfway"):
        Store(url, migrations=(*MIGRATIONS, Migration(len(MIGRATIONS) + 1, "broken", broken)))
    engine = sa.create_engine(url)
    assert current_version(engine) == len(MIGRATIONS)
    assert not sa.inspect(engine).has_table("jobs")
    engine.dispose()


def test_migrations_must_be_numbered_in_order(sqlite_url: str) -> None:
    bad = (*MIGRATIONS, Migration(len(MIGRATIONS) + 2, "gap", _jobs_step))
    with pytest.raises(StoreError, match="in order"):
        Store(sqlite_url, migrations=bad)


# ---- deployments, revisions, APIs, scaling -----------------------------------------


def test_revisions_round_trip_and_dedupe_by_hash(store: Store) -> None:
    apis = [ApiSpec("iris", "1", 0, 4, 2), ApiSpec("iris", "2", 1, 3, 1), ApiSpec("echo")]
    rev, created = store.add_revision(
        "shop",
        "h1",
        config_text="- kind: api\n  name: iris\n",
        artifact_path="/art/h1",
        apis=apis,
        at=T0,
    )
    assert created and rev.deployment == "shop" and rev.content_hash == "h1"
    assert (rev.created_at, rev.status, rev.error) == (T0, "pending", None)
    assert rev.config_text == "- kind: api\n  name: iris\n" and rev.artifact_path == "/art/h1"
    again, created = store.add_revision(
        "shop", "h1", config_text="other", artifact_path="/x", apis=[]
    )
    assert not created and again == rev
    assert store.get_deployment("shop").current_revision is None
    assert store.list_apis("shop") == []  # no current revision yet
    by_rev = store.list_apis("shop", revision="h1")
    assert [(a.name, a.version) for a in by_rev] == [("echo", ""), ("iris", "1"), ("iris", "2")]
    iris1 = by_rev[1]
    assert (iris1.min_replicas, iris1.max_replicas, iris1.init_replicas) == (0, 4, 2)
    assert iris1.requested_replicas == 2

    failed = store.set_revision_status("shop", "h1", "error", "model failed to load")
    assert (failed.status, failed.error) == ("error", "model failed to load")
    store.set_revision_status("shop", "h1", "live")
    dep = store.set_current_revision("shop", "h1", at=T0 + 5)
    assert (dep.current_revision, dep.updated_at, dep.created_at) == ("h1", T0 + 5, T0)
    assert [a.name for a in store.list_apis()] == ["echo", "iris", "iris"]

    store.add_revision(
        "shop",
        "h2",
        config_text="v2",
        artifact_path="/art/h2",
        apis=[ApiSpec("iris", "1", 1, 2, 1)],
        at=T0 + 10,
    )
    store.set_current_revision("shop", "h2")
    assert [r.content_hash for r in store.list_revisions("shop")] == ["h2", "h1"]
    assert [(a.revision, a.max_replicas) for a in store.list_apis("shop")] == [("h2", 2)]
    store.set_current_revision("shop", "h1")  # rollback
    assert store.get_api("shop", "iris", "1").revision == "h1"
    assert store.get_api("shop", "iris", "9") is None
    assert store.get_revision("shop", "nope") is None
    with pytest.raises(NotFoundError):
        store.set_current_revision("shop", "nope")
    with pytest.raises(NotFoundError):
        store.set_revision_status("other", "h1", "live")

    store.ensure_deployment("blog")
    assert [d.name for d in store.list_deployments()] == ["blog", "shop"]
    assert store.delete_deployment("shop") and not store.delete_deployment("shop")
    assert store.list_revisions("shop") == [] and store.list_apis(revision="h1") == []
    assert store.get_deployment("shop") is None


def test_scaling_updates_replicas_and_logs_events(store: Store) -> None:
    store.add_revision(
        "shop", "h1", config_text="", artifact_path="/a", apis=[ApiSpec("iris", "", 0, 5, 1)]
    )
    store.set_current_revision("shop", "h1")
    up = store.scale_api("shop", "iris", 3, reason="in-flight 9 > target 3", at=T0)
    assert (up.api, up.version, up.from_replicas, up.to_replicas, up.at) == ("iris", "", 1, 3, T0)
    store.scale_api("shop", "iris", 0, reason="idle 300s", at=T0 + 60)
    assert store.get_api("shop", "iris").requested_replicas == 0
    store.add_scaling_event("iris", 0, 1, "cold start", at=T0 + 120)
    events = store.scaling_events("iris")
    assert [(e.from_replicas, e.to_replicas, e.reason) for e in events] == [
        (0, 1, "cold start"),
        (3, 0, "idle 300s"),
        (1, 3, "in-flight 9 > target 3"),
    ]
    assert events[-1] == up
    assert len(store.scaling_events("iris", since=T0 + 1)) == 2
    assert len(store.scaling_events("iris", limit=1)) == 1
    assert store.scaling_events("iris", version="2") == []
    with pytest.raises(NotFoundError):
        store.scale_api("shop", "ghost", 1, reason="x")


# ---- tracker ---------------------------------------------------------------------


def test_classification_buckets_by_window(store: Store) -> None:
    store.add_class_counts("iris", {"setosa": 2, "virginica": 1}, version="1", at=T0)
    store.add_class_counts("iris", {"setosa": 1}, version="1", at=T0 + 30)  # same bucket
    store.add_class_counts("iris", {"versicolor": 4}, version="1", at=T0 + TRACKER_BUCKET_S)
    store.add_class_counts("iris", {"setosa": 10}, version="2", at=T0 + 3600)
    store.add_class_counts("other", {"setosa": 100}, at=T0)
    assert store.class_counts("iris") == {"setosa": 13, "virginica": 1, "versicolor": 4}
    assert store.class_counts("iris", version="1") == {
        "setosa": 3,
        "virginica": 1,
        "versicolor": 4,
    }
    # A window includes the whole bucket that holds `since`; `until` is exclusive.
    assert store.class_counts("iris", since=T0 + 59, until=T0 + 3600) == {
        "setosa": 3,
        "virginica": 1,
        "versicolor": 4,
    }
    assert store.class_counts("iris", since=T0 + 60) == {"versicolor": 4, "setosa": 10}
    assert store.class_counts("iris", until=T0 + 60) == {"setosa": 3, "virginica": 1}
    assert store.class_counts("iris", since=T0 + 7200) == {}
    long_label = "x" * 1000
    store.add_class_counts("iris", {long_label: 1}, at=T0)
    assert store.class_counts("iris", version="")["x" * 255] == 1
    assert store.prune_tracker(T0 + 60) > 0
    assert store.class_counts("iris") == {"versicolor": 4, "setosa": 10}


def test_regression_summary_by_window(store: Store) -> None:
    first = [1.0, 2.0, 3.0, 4.0, 100.0]
    assert store.add_regression_values("price", first, at=T0) == 5
    kept = store.add_regression_values("price", [-5.0, float("nan"), float("inf")], at=T0 + 1)
    assert kept == 1
    store.add_regression_values("price", [7.5], version="2", at=T0 + 2 * TRACKER_BUCKET_S)
    assert store.add_regression_values("price", []) == 0

    s = store.regression_summary("price", until=T0 + TRACKER_BUCKET_S)
    assert (s.count, s.minimum, s.maximum) == (6, -5.0, 100.0)
    assert s.total == pytest.approx(105.0) and s.mean == pytest.approx(17.5)
    squares = sum(v * v for v in [*first, -5.0])
    assert s.sum_squares == pytest.approx(squares)
    assert s.stddev == pytest.approx((squares / 6 - 17.5**2) ** 0.5)
    assert s.percentile(0) == -5.0 and s.percentile(100) == 100.0
    assert s.percentile(50) == pytest.approx(2.0, rel=histogram.RELATIVE_ERROR)
    assert sum(s.bins.values()) == 6

    later = store.regression_summary("price", since=T0 + TRACKER_BUCKET_S)
    assert (later.count, later.minimum, later.maximum, later.mean) == (1, 7.5, 7.5, 7.5)
    assert store.regression_summary("price", version="2").count == 1
    empty = store.regression_summary("nothing")
    assert (empty.count, empty.mean, empty.percentile(50), empty.stddev) == (0, None, None, None)


def test_histogram_percentiles_are_accurate() -> None:
    values = [i / 10 for i in range(-500, 10_001)]
    bins = histogram.bin_counts(values)
    ordered = sorted(values)
    for q in (1, 10, 50, 90, 99, 99.9):
        exact = ordered[max(0, math.ceil(len(values) * q / 100) - 1)]
        assert histogram.percentile(bins, q) == pytest.approx(
            exact, rel=histogram.RELATIVE_ERROR, abs=0.1
        )
    assert histogram.bin_of(0.0) == 0 and histogram.bin_of(-3.0) == -histogram.bin_of(3.0)


# ---- usage -------------------------------------------------------------------------


def test_usage_round_trip_per_day_and_class(store: Store) -> None:
    assert status_class(200) == "2xx" and status_class(503) == "5xx"
    store.add_usage("iris", "2xx", 5, at=T0)
    store.add_usage("iris", "4xx", 1, version="1", at=T0)
    store.add_usage_many(
        [
            UsageIncrement("iris", "2xx", 2, at=T0 + 10),
            UsageIncrement("iris", "2xx", 3, at=T0 + USAGE_PERIOD_S),
            UsageIncrement("echo", "5xx", 1, at=T0),
        ]
    )
    day0 = int(T0 // USAGE_PERIOD_S * USAGE_PERIOD_S)
    rows = store.usage(api="iris")
    assert [(r.period_start - day0, r.version, r.status_class, r.count) for r in rows] == [
        (0, "", "2xx", 7),
        (0, "1", "4xx", 1),
        (USAGE_PERIOD_S, "", "2xx", 3),
    ]
    assert store.usage_totals("iris") == {"2xx": 10, "4xx": 1}
    assert store.usage_totals("iris", since=T0 + USAGE_PERIOD_S) == {"2xx": 3}
    assert store.usage_totals("iris", until=day0 + USAGE_PERIOD_S) == {"2xx": 7, "4xx": 1}
    assert {r.api for r in store.usage()} == {"iris", "echo"}
    with pytest.raises(ValueError, match="status class"):
        store.add_usage("iris", "200")
    assert store.usage_totals("iris") == {"2xx": 10, "4xx": 1}  # the bad batch wrote nothing


# ---- concurrency and crashes ----------------------------------------------------------


def test_counters_exact_under_8_threads(store: Store) -> None:
    threads, per_thread = 8, 200
    errors: list[BaseException] = []
    start = threading.Barrier(threads)

    def hammer() -> None:
        try:
            start.wait()
            for i in range(per_thread):
                store.add_usage("iris", "2xx", at=T0)
                store.add_class_counts("iris", {"a": 1, "b": 2}, at=T0)
                if i % 20 == 0:
                    store.add_regression_values("iris", [1.0, 2.0], at=T0)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    pool = [threading.Thread(target=hammer) for _ in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    assert not errors
    total = threads * per_thread
    assert store.usage_totals("iris") == {"2xx": total}
    assert store.class_counts("iris") == {"a": total, "b": 2 * total}
    summary = store.regression_summary("iris")
    assert summary.count == threads * (per_thread // 20) * 2
    assert sum(summary.bins.values()) == summary.count


_WRITER = textwrap.dedent(
    """
    import sys
    from kiln.control.store import ApiSpec, Store
    url, mode, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    s = Store(url)
    if mode == "count":
        for _ in range(n):
            s.add_usage("iris", "2xx", at=1_700_000_000)
        sys.exit(0)
    s.add_revision("shop", "h1", config_text="", artifact_path="/a", apis=[ApiSpec("iris")])
    s.set_current_revision("shop", "h1")
    print("ready", flush=True)
    i = 0
    while True:
        i += 1
        s.scale_api("shop", "iris", i, reason=f"step {i}")
        s.add_class_counts("iris", {"a": 1, "b": 1})
        s.add_regression_values("iris", [float(i)] * 3)
        s.add_usage("iris", "2xx")
    """
)


def _spawn(url: str, mode: str, n: int = 0) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", _WRITER, url, mode, str(n)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_counters_exact_across_processes(url: str) -> None:
    Store(url).close()
    procs = [_spawn(url, "count", 150) for _ in range(3)]
    for p in procs:
        _, err = p.communicate(timeout=90)
        assert p.returncode == 0, err
    with Store(url) as s:
        assert s.usage_totals("iris") == {"2xx": 450}


def test_process_killed_mid_write_leaves_consistent_database(sqlite_url: str) -> None:
    Store(sqlite_url).close()
    proc = _spawn(sqlite_url, "loop")
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        with Store(sqlite_url) as watcher:
            deadline = time.monotonic() + 60
            while watcher.usage_totals("iris").get("2xx", 0) < 60:
                assert time.monotonic() < deadline, "writer made no progress"
                time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    path = sqlite_url.removeprefix("sqlite:///")
    raw = sqlite3.connect(path)
    assert raw.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    raw.close()
    with Store(sqlite_url) as s:  # reopens (recovering the WAL) and keeps working
        counts = s.class_counts("iris")
        assert counts["a"] == counts["b"] >= 60  # each batch counted whole or not at all
        last = s.scaling_events("iris", limit=1)[0]
        api = s.get_api("shop", "iris")
        assert api.requested_replicas == last.to_replicas  # scale + event were atomic
        assert len(s.scaling_events("iris", limit=100_000)) == last.to_replicas
        summary = s.regression_summary("iris")
        assert summary.count % 3 == 0 and sum(summary.bins.values()) == summary.count
        s.add_usage("iris", "2xx")


def test_usable_from_asyncio_through_threads(store: Store) -> None:
    async def main() -> dict[str, int]:
        await asyncio.gather(
            *(asyncio.to_thread(store.add_usage, "iris", "2xx", at=T0) for _ in range(50))
        )
        return await asyncio.to_thread(store.usage_totals, "iris")

    assert asyncio.run(main()) == {"2xx": 50}


def test_only_the_store_touches_the_database() -> None:
    """DESIGN.md: the state store is reached through one module."""
    src = Path(__file__).resolve().parents[1] / "src" / "kiln"
    store_dir = src / "control" / "store"
    offenders = []
    for path in src.rglob("*.py"):
        if store_dir in path.parents:
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            words = line.split()
            if len(words) >= 2 and words[0] in ("import", "from"):
                if words[1].split(".")[0] in ("sqlite3", "sqlalchemy", "alembic", "psycopg"):
                    offenders.append(f"{path.relative_to(src)}: {line.strip()}")
    assert not offenders, offenders
