"""Shared admission (control/shared_quotas.py, store/quota_counters.py): the monthly quota
is checked and counted in the store, so threads (standing in for ingress processes, each
with its own Store) never admit more than the quota. SQLite and PostgreSQL
(KILN_TEST_POSTGRES_URL, an empty database this suite may wipe)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from kiln.control.accounts import Accounts
from kiln.control.quotas import DEFAULT_PLANS, month_bounds
from kiln.control.shared_quotas import SharedQuotaGate
from kiln.control.store import Store
from kiln.control.store.accounts import KeyUsageIncrement
from kiln.errors import TooManyRequests

PG_URL = os.environ.get("KILN_TEST_POSTGRES_URL")
MONTH = int(month_bounds(1_700_000_000.0)[0])


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state.db'}"
    if not PG_URL:
        if os.environ.get("CI") == "true":
            pytest.fail("KILN_TEST_POSTGRES_URL is not set under CI=true")
        pytest.skip("KILN_TEST_POSTGRES_URL not set")
    engine = sa.create_engine(PG_URL)
    with engine.begin() as conn:
        conn.execute(sa.text("DROP SCHEMA public CASCADE"))
        conn.execute(sa.text("CREATE SCHEMA public"))
    engine.dispose()
    return PG_URL


def _race(url: str, threads: int, attempts: int, make: Callable[[Store], Any]) -> list[bool]:
    """`threads` threads, each with its own Store (a process's), `attempts` calls each at
    once; `make(store)` gives a thread its `take()`."""
    results: list[bool] = []
    lock = threading.Lock()
    start = threading.Barrier(threads)

    def worker() -> None:
        with Store(url) as store:
            take = make(store)
            start.wait(timeout=30)
            mine = [take() for _ in range(attempts)]
        with lock:
            results.extend(mine)

    pool = [threading.Thread(target=worker) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in pool)
    return results


def test_eight_threads_never_overshoot_a_quota(url: str) -> None:
    subjects = [("key:k1", 37), ("user:alice", None)]
    results = _race(url, 8, 10, lambda s: lambda: s.take_quota(MONTH, subjects)[0])
    assert results.count(True) == 37 and results.count(False) == 43
    with Store(url) as store:
        assert store.quota_used(MONTH, ["key:k1", "user:alice"]) == {
            "key:k1": 37,
            "user:alice": 37,  # a refused call counts for no subject (one transaction)
        }
        assert store.quota_used(MONTH + 1, ["key:k1"]) == {"key:k1": 0}  # another month


def test_the_tighter_of_two_limits_decides_and_counters_start_from_metered_usage(
    url: str,
) -> None:
    with Store(url) as store:
        # A local `kiln server` on this store metered 4 calls of bob this month already.
        store.add_key_usage_many(
            [KeyUsageIncrement("bob", "kb", "bob.echo", "2xx", 4, at=MONTH + 100.0)]
        )
        ok = [store.take_quota(MONTH, [("user:bob", 6), ("key:kb", 100)]) for _ in range(4)]
        assert [a for a, _ in ok] == [True, True, False, False]
        assert ok[1][1] == {"user:bob": 6, "key:kb": 6}
        assert ok[2][1] == {"user:bob": 6, "key:kb": 6}  # refused: nothing counted
        assert store.prune_quota_counters(MONTH + 1) == 2


def test_gates_in_separate_processes_share_the_quota(url: str) -> None:
    with Store(url) as store:
        accounts = Accounts(store)
        accounts.create_user("carol", plan="free")
        _, key = accounts.create_key("carol", quota=25)
        principal = accounts.authenticate(key)
    admitted: list[dict[str, str]] = []
    refused: list[TooManyRequests] = []
    lock = threading.Lock()

    def make(store: Store) -> Callable[[], bool]:
        gate = SharedQuotaGate(store, Accounts(store), dict(DEFAULT_PLANS))

        def take() -> bool:
            try:
                headers = gate.admit(principal)
            except TooManyRequests as err:
                with lock:
                    refused.append(err)
                return False
            with lock:
                admitted.append(headers)
            return True

        return take

    results = _race(url, 8, 6, make)
    assert results.count(True) == 25 and len(refused) == 23
    remaining = sorted(int(h["X-RateLimit-Remaining"]) for h in admitted)
    assert remaining == list(range(25))  # each admission saw its own place in the quota
    assert all(h["X-RateLimit-Limit"] == "25" for h in admitted)
    assert "key" in str(refused[0]) and "quota of 25" in str(refused[0])
    assert refused[0].headers["X-RateLimit-Remaining"] == "0"  # type: ignore[attr-defined]
