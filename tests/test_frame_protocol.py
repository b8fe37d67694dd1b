"""The server's frame reader (`ipc.FrameProtocol`) over a real socketpair.

It decodes frames in `data_received` instead of a reader task, so it must cut
frames right however the bytes arrive: one byte at a time, several frames in one
read, a large frame in many reads, and hand the first frame to `first()` and the
rest to the handler in order; a malformed frame stops it and is reported once.
"""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest

from kiln.serving import messages as m
from kiln.serving.ipc import BlockingChannel, FrameError, FrameProtocol, encode_frame

FRAMES = [
    (m.Ready(1, {"inputs": []}, False, 0.1), []),
    (m.BatchReply(1, [m.ReplyItem(buffers=1)], 1), [b"x" * 300_000]),
    (m.StreamChunk(2, "text/plain"), [b"chunk"]),
    (m.StreamEnd(2), []),
    (m.BatchReply(3, [m.ReplyItem(buffers=1), m.ReplyItem(buffers=1)], 2), [b"a", b"bc"]),
]


def _wire(frames: list) -> bytes:
    return b"".join(b"".join(bytes(c) for c in encode_frame(msg, bufs)) for msg, bufs in frames)


async def _read(data: bytes, piece: int) -> tuple[list, list]:
    """Send `data` in pieces of `piece` bytes; (frames seen, broken errors)."""
    left, right = socket.socketpair()
    loop = asyncio.get_running_loop()
    transport, channel = await loop.create_connection(
        lambda: FrameProtocol(m.FROM_WORKER), sock=left
    )
    seen: list = []
    broken: list = []
    try:
        right.setblocking(False)
        for start in range(0, len(data), piece):
            await loop.sock_sendall(right, data[start : start + piece])
            await asyncio.sleep(0)
        first = await asyncio.wait_for(channel.first(), 5)
        seen.append((first[0], [bytes(b) for b in first[1]]))
        channel.start(lambda msg, bufs: seen.append((msg, [bytes(b) for b in bufs])), broken.append)
        for _ in range(500):  # bounded: the rest of the bytes may still be on the way
            if len(seen) >= len(FRAMES) or broken:
                break
            await asyncio.sleep(0.01)
    finally:
        transport.close()
        right.close()
    return seen, broken


@pytest.mark.parametrize("piece", [1, 7, 4096, 65536, 10**7])
def test_frames_are_cut_right_however_the_bytes_arrive(piece: int) -> None:
    data = _wire(FRAMES)
    if piece == 1:  # a byte at a time for the small frames only (300 KB would take long)
        data = _wire(FRAMES[:1] + FRAMES[2:])
        expected = FRAMES[:1] + FRAMES[2:]
    else:
        expected = FRAMES
    seen, broken = asyncio.run(_read(data, piece))
    assert broken == []
    assert [msg for msg, _ in seen[: len(expected)]] == [msg for msg, _ in expected]
    assert [bufs for _, bufs in seen[: len(expected)]] == [
        [bytes(b) for b in bufs] for _, bufs in expected
    ]


def test_a_malformed_frame_after_the_first_is_reported_once_and_reading_stops() -> None:
    garbage = struct.pack("!I", 9) + b"\x00" * 9  # header length and count that do not add up
    data = _wire(FRAMES[:1]) + garbage + _wire(FRAMES[2:3])
    seen, broken = asyncio.run(_read(data, 65536))
    assert [type(msg) for msg, _ in seen] == [m.Ready]
    assert len(broken) == 1 and isinstance(broken[0], FrameError)


def test_the_socket_closing_before_the_first_frame_is_a_connection_error() -> None:
    async def go() -> type[BaseException]:
        left, right = socket.socketpair()
        loop = asyncio.get_running_loop()
        transport, channel = await loop.create_connection(
            lambda: FrameProtocol(m.FROM_WORKER), sock=left
        )
        right.close()
        try:
            await asyncio.wait_for(channel.first(), 5)
        except BaseException as exc:  # noqa: BLE001 - the type is the assertion
            await asyncio.wait_for(channel.closed, 5)
            return type(exc)
        finally:
            transport.close()
        return type(None)

    assert asyncio.run(go()) is ConnectionError


def test_the_blocking_channel_reads_frames_that_came_in_one_read() -> None:
    """The worker's side reads ahead (one recv for a frame's prefix and body): frames that
    arrived together are all handed out, in order, large ones included."""
    left, right = socket.socketpair()
    try:
        channel = BlockingChannel(left, m.TO_WORKER)
        big = b"y" * 200_000
        frames = [
            (m.Batch(1, [m.RequestItem("a")]), [b"[1]"]),
            (m.Batch(2, [m.RequestItem("b")]), [big]),
            (m.Stop(), []),
        ]
        right.sendall(_wire(frames))
        got = [channel.recv() for _ in frames]
        assert [g[0] for g in got if g is not None] == [msg for msg, _ in frames]
        assert [bytes(g[1][0]) for g in got[:2] if g is not None] == [b"[1]", big]
        right.close()
        assert channel.recv() is None
    finally:
        left.close()


def test_a_cancel_read_ahead_with_the_stream_is_still_seen() -> None:
    """A `Cancel` that arrived in the same read as the frame before it sits in the read-ahead
    buffer, where select() cannot see it: `cancelled` must look there too."""
    left, right = socket.socketpair()
    try:
        channel = BlockingChannel(left, m.TO_WORKER)
        right.sendall(_wire([(m.Stream(5, [m.RequestItem("s")]), [b"{}"]), (m.Cancel(5), [])]))
        first = channel.recv()
        assert first is not None and first[0] == m.Stream(5, [m.RequestItem("s")])
        assert channel.cancelled(5) is True
    finally:
        left.close()
        right.close()
