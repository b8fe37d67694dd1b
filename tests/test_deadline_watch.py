"""Each request's backstop past its deadline (`batcher.DeadlineWatch`): one sweeping timer.

Unit level, on a real event loop: an overdue request is answered 504 by the sweep
(a second past its deadline, or past when it was queued if the deadline had
already gone by), an answered one is left alone, and the timer stops when no
request waits, so an idle API holds no timer.
"""

from __future__ import annotations

import asyncio
import time

from kiln.errors import Timeout
from kiln.serving.batcher import BACKSTOP_S, SWEEP_S, DeadlineWatch, Pending
from kiln.serving.types import InferenceRequest


def pending(
    deadline_in: float, loop: asyncio.AbstractEventLoop, queued_ago: float = 0.0
) -> Pending:
    now = time.monotonic()
    request = InferenceRequest(api="a", version=None, request_id="r", body=b"", protocol="native")
    return Pending(request, now + deadline_in, now, loop.create_future())


def expire(p: Pending) -> None:
    if not p.future.done():
        p.future.set_exception(Timeout("past its deadline"))


def test_overdue_requests_get_their_504_from_one_sweeping_timer() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        watch = DeadlineWatch(expire)
        late = pending(0.05, loop)  # due at 0.05 + BACKSTOP_S
        answered = pending(0.05, loop)
        patient = pending(30.0, loop)
        overdue_at_entry = pending(-5.0, loop)  # its deadline passed while it waited to load
        for p in (late, answered, patient, overdue_at_entry):
            watch.add(p, loop)
        answered.future.set_result("done")
        watch.discard(answered)
        await asyncio.sleep(BACKSTOP_S * 0.5)
        assert not late.future.done() and not overdue_at_entry.future.done()
        await asyncio.sleep(BACKSTOP_S * 0.55 + 2 * SWEEP_S)
        assert isinstance(late.future.exception(), Timeout)
        assert isinstance(overdue_at_entry.future.exception(), Timeout)  # a second after entry
        assert answered.future.result() == "done" and not patient.future.done()
        assert len(watch) == 1  # only the patient one is still watched
        watch.discard(patient)
        await asyncio.sleep(2 * SWEEP_S)
        assert watch._timer is None  # nothing waits: no timer left behind

    asyncio.run(scenario())


def test_the_timer_is_shared_not_one_per_request() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        watch = DeadlineWatch(expire)
        many = [pending(30.0, loop) for _ in range(100)]
        for p in many:
            watch.add(p, loop)
        timer = watch._timer
        assert timer is not None
        for p in many[:50]:
            watch.discard(p)
        assert watch._timer is timer and len(watch) == 50
        for p in many[50:]:
            watch.discard(p)
        await asyncio.sleep(2 * SWEEP_S)
        assert watch._timer is None

    asyncio.run(scenario())
