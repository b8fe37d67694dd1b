"""The durable batch queue in the state store: delivery, leases, dead letters, completion.

SQLite files in tmp_path; with KILN_TEST_POSTGRES_URL set, PostgreSQL too.
"""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import pytest
import sqlalchemy as sa

from kiln.batch.globs import keep
from kiln.batch.sources import SourceError, iter_batches, list_files
from kiln.batch.spec import JobSpec, Limits
from kiln.control.store import Store
from kiln.control.store.jobs import QueuedBatch

PG_URL = os.environ.get("KILN_TEST_POSTGRES_URL")
T0 = 1_700_000_000.0


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state.db'}"
    if not PG_URL:
        pytest.skip("KILN_TEST_POSTGRES_URL not set")
    engine = sa.create_engine(PG_URL)
    with engine.begin() as conn:
        conn.execute(sa.text("DROP SCHEMA public CASCADE"))
        conn.execute(sa.text("CREATE SCHEMA public"))
    engine.dispose()
    return PG_URL


def _job(store: Store, job_id: str = "j1", batches: int = 3, receives: int = 2) -> None:
    store.create_job(
        job_id,
        "scorer",
        spec="{}",
        plan="{}",
        workers=1,
        max_receive_count=receives,
        visibility_timeout=10.0,
        timeout=None,
        at=T0,
    )
    store.enqueue(
        job_id, [QueuedBatch(i, i * 2, 2, b"[%d,%d]" % (i, i)) for i in range(batches)], at=T0
    )
    store.finish_enqueue(job_id, at=T0)


def test_claim_ack_counts_once_and_drains(url: str) -> None:
    with Store(url) as store:
        _job(store)
        first = store.claim_batch("j1", at=T0)
        assert first.state == "batch" and first.batch is not None and first.batch.idx == 0
        second = store.ack_batch("j1", first.batch, 0.5, at=T0)
        assert second is not None and second.batch is not None and second.batch.idx == 1
        assert store.ack_batch("j1", first.batch, 0.5, claim_next=False, at=T0) is None  # again
        job = store.get_job("j1")
        assert job is not None and (job.succeeded, job.succeeded_items) == (1, 2)
        third = store.ack_batch("j1", second.batch, 0.5, at=T0)
        assert third is not None and third.batch is not None
        assert store.claim_batch("j1", at=T0).state == "wait"  # batch 2 is held
        store.ack_batch("j1", third.batch, 0.5, claim_next=False, at=T0)
        assert store.claim_batch("j1", at=T0).state == "drained"
        assert store.claim_completion("j1", 10, at=T0)
        assert not store.claim_completion("j1", 10, at=T0 + 1)  # held by the winner
        assert store.finish_job("j1", at=T0 + 2) == "succeeded"
        assert store.claim_batch("j1", at=T0).state == "stop"


def test_lapsed_lease_is_redelivered_then_dead_lettered(url: str) -> None:
    with Store(url) as store:
        _job(store, batches=1, receives=2)
        claim = store.claim_batch("j1", at=T0)
        assert claim.batch is not None and claim.batch.receive_count == 1
        assert store.claim_batch("j1", at=T0 + 5).state == "wait"  # invisible for 10 s
        again = store.claim_batch("j1", at=T0 + 11)  # the holder died: redelivered
        assert again.batch is not None and again.batch.receive_count == 2
        assert not store.extend_lease("j1", claim.batch, 10, at=T0 + 11)  # stale lease
        # A stale holder's ack does not count; the current holder's failure dead-letters it.
        store.ack_batch("j1", claim.batch, 1.0, claim_next=False, at=T0 + 11)
        assert store.fail_batch("j1", again.batch, "ValueError: bad item", at=T0 + 12)
        (letter,) = store.dead_letters("j1")
        assert (letter.idx, letter.receive_count, letter.error) == (0, 2, "ValueError: bad item")
        job = store.get_job("j1")
        assert job is not None and (job.succeeded, job.failed, job.failed_items) == (0, 1, 2)
        assert store.claim_batch("j1", at=T0 + 12).state == "drained"
        assert store.claim_completion("j1", 10, at=T0 + 12)
        assert store.finish_job("j1", at=T0 + 13) == "completed_with_failures"


def test_crash_on_last_receive_dead_letters_at_next_claim(url: str) -> None:
    with Store(url) as store:
        _job(store, batches=1, receives=1)
        assert store.claim_batch("j1", at=T0).batch is not None
        assert store.claim_batch("j1", at=T0 + 11).state == "drained"
        (letter,) = store.dead_letters("j1")
        assert "delivered 1 times without finishing" in letter.error


def test_end_job_drops_the_queue_and_first_status_wins(url: str) -> None:
    with Store(url) as store:
        _job(store)
        assert store.end_job("j1", "stopped", error="by request", at=T0)
        assert not store.end_job("j1", "timed_out", at=T0)
        assert store.queue_counts("j1", at=T0) == (0, 0)
        job = store.get_job("j1")
        assert job is not None and job.status == "stopped" and job.ended_at == T0
        assert not store.enqueue("j1", [QueuedBatch(9, 0, 1, b"[1]")])


def test_release_leases_makes_held_batches_visible(url: str) -> None:
    with Store(url) as store:
        _job(store)
        store.claim_batch("j1", at=T0)
        assert store.queue_counts("j1", at=T0) == (2, 1)
        assert store.release_leases("j1", at=T0) == 1
        assert store.queue_counts("j1", at=T0) == (3, 0)


def _claim_all(url: str, out: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    with Store(url) as store:
        got = []
        claim = store.claim_batch("j1")
        while claim.state in ("batch", "wait"):
            if claim.batch is None:
                claim = store.claim_batch("j1")
                continue
            got.append(claim.batch.idx)
            claim = store.ack_batch("j1", claim.batch, 0.0)
        out.put(got)


def test_concurrent_workers_never_share_a_batch(url: str) -> None:
    with Store(url) as store:
        store.create_job(
            "j1",
            "scorer",
            spec="{}",
            plan="{}",
            workers=4,
            max_receive_count=1,
            visibility_timeout=60,
            timeout=None,
        )
        store.enqueue("j1", [QueuedBatch(i, i, 1, b"[0]") for i in range(400)])
        store.finish_enqueue("j1")
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_claim_all, args=(url, out)) for _ in range(4)]
    for p in procs:
        p.start()
    claimed = [i for _ in procs for i in out.get(timeout=60)]
    for p in procs:
        p.join(30)
    assert sorted(claimed) == list(range(400))
    with Store(url) as store:
        job = store.get_job("j1")
        assert job is not None and job.succeeded == 400


# ---- sources and globs -------------------------------------------------------------


def test_globs_follow_cortex() -> None:
    assert keep("/d/a/b.jpg", "a/b.jpg", ["**.jpg"], [])
    assert not keep("/d/a/b.png", "a/b.png", ["**.jpg"], [])
    assert keep("/d/a/b.jpg", "a/b.jpg", ["*.jpg"], [])  # no slash: the file name too
    assert not keep("/d/skip/b.jpg", "skip/b.jpg", [], ["skip/**"])
    assert keep("/d/a/b.jpg", "a/b.jpg", [], [])


def test_sources_stream_exact_batches_and_resume(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.jsonl").write_text("".join(f'{{"n": {i}}}\n' for i in range(7)))
    (data / "b.jsonl").write_text('{"n": 7}\n\n{"n": 8}\n')
    (data / "notes.txt").write_text("x")
    spec = JobSpec(
        workers=1, source="delimited_files", batch_size=4, paths=["data"], includes=["**.jsonl"]
    )
    assert [Path(f).name for f in list_files(spec, tmp_path)] == ["a.jsonl", "b.jsonl"]
    batches = list(iter_batches(spec, tmp_path, Limits()))
    assert [(b.idx, b.item_start, b.item_count) for b in batches] == [
        (0, 0, 4),
        (1, 4, 4),
        (2, 8, 1),
    ]
    assert batches[2].payload == b'[{"n": 8}]'
    resumed = list(iter_batches(spec, tmp_path, Limits(), start=2))
    assert [b.idx for b in resumed] == [2]
    with pytest.raises(SourceError, match="over the batch limit of 10 bytes"):
        list(iter_batches(spec, tmp_path, Limits(max_batch_bytes=10)))
    (data / "c.jsonl").write_text("{not json}\n")
    with pytest.raises(SourceError, match="c.jsonl line 1 is not valid JSON"):
        list(iter_batches(spec, tmp_path, Limits()))
