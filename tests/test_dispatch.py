"""The dispatcher without HTTP: a real ServedApi with real Python-handler workers.

Fair placement (capacity is taken at dispatch), requests that never started on a
killed worker go back to the queue, streams count as work in flight, and
`autoscaling.max_replica_concurrency` is enforced at admission.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from support import write

from kiln.config.loader import load_project
from kiln.errors import Timeout, Unavailable
from kiln.serving.served import ServedApi
from kiln.serving.types import InferenceRequest

HANDLER = """
import os
import time


def _chunks(count, pause):
    for step in range(count):
        time.sleep(pause)
        yield f"{step},"


class Handler:
    def predict(self, payload, context):
        kind = payload.get("kind")
        if kind == "hang":
            time.sleep(60)
        if kind == "stream":
            return _chunks(payload["count"], payload["pause"])
        time.sleep(payload.get("sleep", 0))
        return os.getpid()
"""

_ids = itertools.count()


def make_served(root: Path, extra: str = "") -> ServedApi:
    write(root / "h.py", HANDLER)
    write(
        root / "kiln.yaml",
        f"- kind: api\n  name: d\n  python: {{handler: h.py:Handler}}\n{extra}",
    )
    (api,) = load_project(root).apis
    return ServedApi(api, cwd=str(root), log_line=lambda line, replica=None: None)


def request(payload: Any, deadline_in: float | None = None) -> InferenceRequest:
    deadline = time.monotonic() + deadline_in if deadline_in is not None else None
    return InferenceRequest(
        api="d",
        version=None,
        request_id=f"r{next(_ids)}",
        body=orjson.dumps(payload),
        deadline=deadline,
    )


async def pid_of(served: ServedApi, payload: Any, deadline_in: float | None = None) -> int:
    response = await served.predict(request(payload, deadline_in))
    assert response.status == 200, response.body
    return int(orjson.loads(response.body))


async def started(served: ServedApi, replicas: int) -> ServedApi:
    await served.start(replicas)
    assert served.state == "ready", served.error
    assert len(served.ready_slots()) == replicas
    return served


def test_a_burst_spreads_over_idle_replicas_and_none_exceeds_its_depth(tmp_path: Path) -> None:
    async def main() -> tuple[Counter[int], int]:
        served = await started(make_served(tmp_path), 2)
        most = 0
        done = asyncio.Event()

        async def watch() -> None:  # the largest number of batches one replica ever held
            nonlocal most
            while not done.is_set():
                for slot in served.slots:
                    if slot.replica is not None:
                        most = max(most, slot.replica.batches_in_flight)
                await asyncio.sleep(0)

        watcher = asyncio.create_task(watch())
        try:
            pids = await asyncio.gather(*(pid_of(served, {"sleep": 0.01}) for _ in range(100)))
        finally:
            done.set()
            await watcher
            await served.stop(5)
        return Counter(pids), most

    split, most = asyncio.run(main())
    assert len(split) == 2, split
    assert all(40 <= count <= 60 for count in split.values()), split
    assert most == 2  # batching off: one running and one waiting in the worker, never more


def test_requests_behind_a_hung_worker_are_requeued_not_failed(tmp_path: Path) -> None:
    """One replica; the first request hangs past response_timeout_s and the worker is killed.

    The request sent to the worker behind it and the 18 queued never started: the
    restarted worker answers all 19 (they carry their own, longer deadlines)."""

    async def main() -> tuple[BaseException | int, list[Any], int, int]:
        served = await started(make_served(tmp_path, "  serving: {response_timeout_s: 2s}\n"), 1)
        first_pid = served.slots[0].replica.pid  # type: ignore[union-attr]
        try:
            hung = asyncio.ensure_future(pid_of(served, {"kind": "hang"}))
            await asyncio.sleep(0.3)  # the hung request runs in the worker
            others = [asyncio.ensure_future(pid_of(served, {}, deadline_in=60)) for _ in range(19)]
            hung_outcome = (await asyncio.gather(hung, return_exceptions=True))[0]
            outcomes = await asyncio.gather(*others, return_exceptions=True)
            return hung_outcome, outcomes, first_pid, served.restarts
        finally:
            await served.stop(5)

    hung_outcome, outcomes, first_pid, restarts = asyncio.run(main())
    assert isinstance(hung_outcome, Timeout), hung_outcome
    failures = [o for o in outcomes if isinstance(o, BaseException)]
    assert failures == []
    assert len(set(outcomes)) == 1 and first_pid not in outcomes  # the restarted worker
    assert restarts == 1


def test_a_batch_never_waits_behind_a_stream(tmp_path: Path) -> None:
    """A stream and an ordinary request on one replica: the request is not sent behind the
    stream (where it would overrun and the kill would cut the stream); it waits in the
    queue and times out there, and the stream ends whole."""

    async def main() -> tuple[bytes, BaseException | int, int]:
        served = await started(make_served(tmp_path, "  serving: {response_timeout_s: 1s}\n"), 1)
        try:
            chunks: list[bytes] = []

            async def consume() -> None:
                async for chunk, _ in served.stream(
                    request({"kind": "stream", "count": 10, "pause": 0.25})
                ):
                    chunks.append(chunk)

            streaming = asyncio.ensure_future(consume())
            await asyncio.sleep(0.4)
            replica = served.slots[0].replica
            assert replica is not None and replica.streams_in_flight == 1
            assert replica.batches_in_flight == 1 and replica.in_flight == 1  # streams count
            ordinary = (await asyncio.gather(pid_of(served, {}), return_exceptions=True))[0]
            await streaming
            return b"".join(chunks), ordinary, served.restarts
        finally:
            await served.stop(5)

    body, ordinary, restarts = asyncio.run(main())
    assert body == b"".join(f"{i},".encode() for i in range(10))
    assert isinstance(ordinary, Timeout), ordinary
    assert restarts == 0  # nothing was killed


def test_batches_go_to_the_replica_without_a_stream(tmp_path: Path) -> None:
    async def main() -> tuple[int, list[int], bytes]:
        served = await started(make_served(tmp_path), 2)
        try:
            chunks: list[bytes] = []

            async def consume() -> None:
                stream = served.stream(request({"kind": "stream", "count": 8, "pause": 0.25}))
                async for chunk, _ in stream:
                    chunks.append(chunk)

            streaming = asyncio.ensure_future(consume())
            await asyncio.sleep(0.3)
            (streamer,) = [
                s.replica.pid for s in served.slots if s.replica and s.replica.streams_in_flight
            ]
            pids = await asyncio.gather(*(pid_of(served, {"sleep": 0.05}) for _ in range(12)))
            await streaming
            return streamer, pids, b"".join(chunks)
        finally:
            await served.stop(5)

    streamer, pids, body = asyncio.run(main())
    assert streamer not in pids and len(set(pids)) == 1
    assert body == b"".join(f"{i},".encode() for i in range(8))


def test_max_replica_concurrency_refuses_at_admission(tmp_path: Path) -> None:
    async def main() -> list[Any]:
        extra = "  autoscaling: {max_replica_concurrency: 3}\n  serving: {max_queue_size: 100}\n"
        served = await started(make_served(tmp_path, extra), 1)
        try:
            calls = [pid_of(served, {"sleep": 0.5}) for _ in range(7)]
            return await asyncio.gather(*calls, return_exceptions=True)
        finally:
            await served.stop(5)

    outcomes = asyncio.run(main())
    answered = [o for o in outcomes if isinstance(o, int)]
    refused = [o for o in outcomes if isinstance(o, Unavailable)]
    assert len(answered) == 3 and len(refused) == 4, outcomes
    assert all(e.status == 503 and e.retry_after for e in refused)
    assert "autoscaling.max_replica_concurrency" in str(refused[0])


@pytest.mark.parametrize("replicas", [2])
def test_requests_queued_after_a_kill_reach_the_other_replica(
    tmp_path: Path, replicas: int
) -> None:
    """A worker SIGKILLed with a running request and one waiting behind it: the waiting
    one (it never started) is answered by the other replica, the running one gets 503."""

    async def main() -> tuple[list[Any], set[int]]:
        served = await started(make_served(tmp_path), replicas)
        try:
            calls = [asyncio.ensure_future(pid_of(served, {"sleep": 1.0})) for _ in range(4)]
            await asyncio.sleep(0.4)  # each replica runs one and holds one behind it
            victim = served.slots[0].replica
            assert victim is not None and victim.batches_in_flight == 2
            await victim.kill("killed by the test")
            outcomes = await asyncio.gather(*calls, return_exceptions=True)
            pids = {s.replica.pid for s in served.slots if s.replica is not None}
            return outcomes, pids | {victim.pid or 0}
        finally:
            await served.stop(5)

    outcomes, _ = asyncio.run(main())
    failed = [o for o in outcomes if isinstance(o, BaseException)]
    assert len(failed) == 1 and isinstance(failed[0], Unavailable), outcomes
    assert "before answering" in str(failed[0])
    assert len([o for o in outcomes if isinstance(o, int)]) == 3


def test_requests_queued_behind_a_busy_replica_do_not_wake_the_dispatcher(tmp_path: Path) -> None:
    """With batching and the one replica busy, a new request cannot be placed: the
    dispatcher waiting for capacity is not woken for it (each wake-up was a wasted task
    step per request at c=64). A full batch is the exception: it may go ahead."""
    batching = "  batching: {max_batch_size: 8, max_batch_delay_ms: 2}\n"

    async def main() -> tuple[int, int, list[int]]:
        served = await started(make_served(tmp_path, batching), 1)
        picks = 0
        pick = served._pick

        def counted() -> Any:
            nonlocal picks
            picks += 1
            return pick()

        served._pick = counted  # type: ignore[method-assign]
        try:
            busy = asyncio.ensure_future(pid_of(served, {"sleep": 0.6}))
            await asyncio.sleep(0.2)  # the slow one runs; the dispatcher waits for capacity
            before = picks
            queued = []
            for _ in range(5):  # one at a time, as clients' requests arrive
                queued.append(asyncio.ensure_future(pid_of(served, {})))
                await asyncio.sleep(0.02)
            while_busy = picks - before
            pids = await asyncio.gather(busy, *queued)
            return while_busy, len(served.queue), pids
        finally:
            await served.stop(5)

    while_busy, left, pids = asyncio.run(main())
    # The first arrival is tried at once (`_dispatch_now`) and wakes the dispatcher from an
    # empty queue: two looks; the next four arrivals add none (before: one each).
    assert while_busy == 2
    assert left == 0 and len(set(pids)) == 1  # all six answered by the one replica
