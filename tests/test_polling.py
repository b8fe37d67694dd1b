"""Busy-polling for imminent answers (serving/polling.py), at the level where it lives.

The window's learning rule (haltpoll's: grow when a wait ended soon after the
window, shrink when it ended past the limit), the poll loop over a real
socketpair, the worker's channel polling before it blocks (and still reading
every frame whole, however the bytes arrive), and the server-side rule: a
replica polls only when its batch is the server's only request.
"""

from __future__ import annotations

import asyncio
import select
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from kiln.sandbox.policy import SandboxPolicy, base_env
from kiln.serving import messages as m
from kiln.serving import polling
from kiln.serving.ipc import BlockingChannel, encode_frame
from kiln.serving.polling import GROW_START_S, PollWindow, for_limit, wait_readable
from kiln.serving.replica import Replica
from kiln.serving.types import InferenceRequest, WorkerSpec


def test_window_grows_from_the_start_value_while_waits_end_within_the_limit() -> None:
    window = PollWindow(500e-6)
    assert window.window == 0.0
    window.learn(120e-6)  # past the (empty) window, within the limit: grow
    assert window.window == pytest.approx(GROW_START_S)
    window.learn(120e-6)
    assert window.window == pytest.approx(2 * GROW_START_S)
    window.learn(120e-6)
    assert window.window == pytest.approx(4 * GROW_START_S)
    window.learn(120e-6)  # caught within the window: unchanged
    assert window.window == pytest.approx(4 * GROW_START_S)
    for _ in range(10):
        window.learn(499e-6)
    assert window.window == pytest.approx(500e-6)  # never past the limit


def test_window_shrinks_to_zero_when_waits_outlast_the_limit() -> None:
    window = PollWindow(500e-6)
    window.window = 400e-6
    seen = []
    for _ in range(6):
        window.learn(0.5)  # a request every half second: polling would only burn CPU
        seen.append(window.window)
    assert seen[:3] == pytest.approx([200e-6, 100e-6, 50e-6])
    assert seen[3:] == [0.0, 0.0, 0.0]


def test_polling_is_off_at_limit_zero_and_on_one_cpu() -> None:
    assert for_limit(0, cpus=8) is None
    assert for_limit(500, cpus=1) is None
    window = for_limit(500, cpus=2)
    assert window is not None and window.limit == pytest.approx(500e-6)


def test_wait_readable_returns_when_data_arrives_and_gives_up_after_the_window() -> None:
    left, right = socket.socketpair()
    try:
        poller = select.poll()
        poller.register(left.fileno(), select.POLLIN)
        started = time.perf_counter()
        assert wait_readable(poller, 0.002) is False
        assert time.perf_counter() - started >= 0.002
        timer = threading.Timer(0.001, right.send, (b"x",))
        timer.start()
        assert wait_readable(poller, 5.0) is True  # well before the 5 s window
        assert left.recv(1) == b"x"
        timer.join()
    finally:
        left.close()
        right.close()


def test_a_polling_channel_reads_every_frame_whole_and_learns_its_window() -> None:
    left, right = socket.socketpair()
    channel = BlockingChannel(left, m.TO_WORKER)
    channel.poll = PollWindow(0.05)
    frames = [m.Batch(i, [m.RequestItem(f"r{i}", buffers=1)]) for i in range(1, 6)]
    wire = [b"".join(bytes(c) for c in encode_frame(f, [b"{}" * i])) for i, f in enumerate(frames)]

    def send_slowly() -> None:
        for data in wire:  # each frame in two pieces, 2 ms apart: polled for, then blocked on
            time.sleep(0.002)
            right.sendall(data[:3])
            time.sleep(0.002)
            right.sendall(data[3:])

    sender = threading.Thread(target=send_slowly)
    sender.start()
    try:
        got = [channel.recv() for _ in frames]
    finally:
        sender.join()
        left.close()
        right.close()
    assert [frame[0].id for frame in got if frame is not None] == [1, 2, 3, 4, 5]
    assert [bytes(frame[1][0]) for frame in got if frame is not None] == [
        b"{}" * i for i in range(5)
    ]
    # Waits of ~2 ms under a 50 ms limit taught the window to grow past its start.
    assert channel.poll.window > GROW_START_S


def test_activity_counts_the_inference_ports_requests() -> None:
    activity = polling.Activity()
    assert not activity.alone()
    activity.requests += 1
    assert activity.alone()
    activity.requests += 1
    assert not activity.alone()


# ----- the server side: a real Replica and a worker that answers after 300 ms -------------

SLOW_WORKER = """
import socket, sys, time
from kiln.serving import messages as m
from kiln.serving.ipc import BlockingChannel
channel = BlockingChannel(socket.socket(fileno=int(sys.argv[1])), m.TO_WORKER)
channel.recv()  # Init
channel.send(m.Ready(1, {}, False, 0.0))
while (frame := channel.recv()) is not None:
    time.sleep(0.3)
    channel.send(m.BatchReply(frame[0].id, [m.ReplyItem(buffers=1)], 1), [b'"pong"'])
"""


def _slow_replica(tmp_path: Path) -> Replica:
    def launch(argv: list[str], fds: tuple[int, ...]) -> Any:
        policy = SandboxPolicy(enabled=False, home=tmp_path)
        program = [sys.executable, "-c", SLOW_WORKER, argv[-1]]
        return policy.launch(program, base_env(), cwd=str(tmp_path), pass_fds=fds)

    spec = WorkerSpec(api="echo", version="v1", runtime="python", poll_us=2_000_000)
    return Replica(spec, launch=launch, log_line=lambda line: None)


@pytest.mark.skipif(polling.usable_cpus() < 2, reason="polling is off with one CPU")
@pytest.mark.parametrize("requests", [1, 2], ids=["alone", "other-work"])
def test_a_replica_polls_for_its_answer_only_as_the_servers_only_request(
    tmp_path: Path, requests: int
) -> None:
    async def go() -> tuple[bool, bool]:
        replica = _slow_replica(tmp_path)
        await replica.start(timeout=30)
        assert replica._poll is not None
        replica._poll.window = 1.0  # as if the last answers came within a second
        before = polling.ACTIVITY.requests
        polling.ACTIVITY.requests = requests
        try:
            request = InferenceRequest(api="echo", version="v1", request_id="r1", body=b"{}")
            future = replica.send_batch([request], timeout=30)
            answered_on_return = replica._poller is not None and bool(replica._poller.poll(0))
            (outcome,) = await asyncio.wait_for(future, 20)
            assert not isinstance(outcome, BaseException) and outcome.body == b'"pong"'
            return answered_on_return, future.done()
        finally:
            polling.ACTIVITY.requests = before
            await replica.stop(grace=2)

    answered_on_return, _ = asyncio.run(go())
    # Alone: send_batch waited awake until the answer was there (300 ms < the 1 s window).
    # With other work in progress it returned at once, long before the worker answered.
    assert answered_on_return is (requests == 1)


@pytest.mark.parametrize("armed", [True, False], ids=["armed", "disarmed"])
def test_a_channel_spins_only_when_armed(armed: bool) -> None:
    """After a batch of several requests the worker disarms polling (`Worker.run`): the
    next frame is not imminent, and spinning would take CPU the server and clients need.
    Spinning shows as CPU time of the waiting thread; blocking in `recv` uses none."""
    left, right = socket.socketpair()
    channel = BlockingChannel(left, m.TO_WORKER)
    channel.poll = PollWindow(1.0)
    channel.poll.window = 1.0
    channel.poll_armed = armed
    frame = b"".join(bytes(c) for c in encode_frame(m.Batch(1, [m.RequestItem("r1")]), [b"{}"]))
    timer = threading.Timer(0.2, right.sendall, (frame,))
    timer.start()
    try:
        cpu = time.thread_time()
        got = channel.recv()
        spent = time.thread_time() - cpu
    finally:
        timer.join()
        left.close()
        right.close()
    assert got is not None and got[0].id == 1
    if armed:
        assert spent > 0.05  # it spun (with sched_yield) for most of the 0.2 s
    else:
        assert spent < 0.05  # it slept in recv
