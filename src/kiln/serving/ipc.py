"""Framing between the server and its worker processes.

A frame is `[u32 total][u32 header_len][u32 n][n x u32 buffer length][header][buffer 0]...`:
the header is one typed message (`kiln.serving.messages`, MessagePack via
msgspec) and the buffers are the bytes it accounts for. Bodies and tensors
travel as raw buffers, never pickled and never re-encoded: the worker parses
the client's JSON once and the server forwards the worker's bytes as they are.

A frame that does not parse, or whose header is not a kind the reader expects,
raises `FrameError` with what was wrong: the reader decides what that costs
(the server restarts the worker that sent it; it never takes the server down).
"""

from __future__ import annotations

import asyncio
import select
import socket
import struct
import time
from collections import deque
from collections.abc import Sequence
from typing import Any, Generic, TypeVar

import msgspec

from kiln.serving.messages import Cancel, Message
from kiln.serving.polling import PollWindow, wait_readable

_TOTAL = struct.Struct("!I")
_HEAD = struct.Struct("!II")  # header length, buffer count
MAX_FRAME = 1 << 31
_READ_AHEAD = 65536  # a blocking reader's read size (BlockingChannel)
_ENCODER = msgspec.msgpack.Encoder()

M = TypeVar("M")
Frame = tuple[M, list[memoryview]]


class FrameError(ValueError):
    """A frame that is not a valid message for its reader (its text says what is wrong)."""


def encode_frame(message: Message, buffers: Sequence[Any] = ()) -> list[bytes]:
    """Return the frame as a list of chunks, so large buffers are written without a copy."""
    header = _ENCODER.encode(message)
    count = len(buffers)
    lengths = [len(b) for b in buffers]
    total = 8 + 4 * count + len(header) + sum(lengths)
    prefix = struct.pack(f"!III{count}I", total, len(header), count, *lengths)
    return [prefix, header, *buffers]


def decode_frame(
    payload: bytes | bytearray | memoryview, decoder: msgspec.msgpack.Decoder[M]
) -> Frame[M]:
    """Split a frame body (everything after the total length) into message and buffers."""
    view = memoryview(payload)
    size = len(view)
    if size < 8:
        raise FrameError(f"a frame of {size} bytes is shorter than its header")
    header_len, count = _HEAD.unpack_from(view, 0)
    offset = 8 + 4 * count
    if offset + header_len > size:
        raise FrameError(f"a frame of {size} bytes declares {count} buffers and a longer header")
    lengths = struct.unpack_from(f"!{count}I", view, 8)
    if offset + header_len + sum(lengths) != size:
        raise FrameError(f"a frame of {size} bytes declares buffers that do not add up to it")
    try:
        message = decoder.decode(view[offset : offset + header_len])
    except msgspec.DecodeError as exc:  # ValidationError included: a wrong kind or field
        raise FrameError(f"a frame's header is not a valid message: {exc}") from None
    offset += header_len
    buffers: list[memoryview] = []
    for length in lengths:
        buffers.append(view[offset : offset + length])
        offset += length
    return message, buffers


def _check_total(total: int) -> None:
    if total > MAX_FRAME:
        raise FrameError(f"a frame declares {total} bytes, over the {MAX_FRAME}-byte limit")


async def read_frame(reader: asyncio.StreamReader, decoder: msgspec.msgpack.Decoder[M]) -> Frame[M]:
    """Read one frame; raises asyncio.IncompleteReadError when the peer is gone."""
    (total,) = _TOTAL.unpack(await reader.readexactly(4))
    _check_total(total)
    return decode_frame(await reader.readexactly(total), decoder)


class FrameProtocol(asyncio.Protocol, Generic[M]):
    """The server's side of a worker's socket: each frame is decoded and handed on in the
    event-loop turn its last byte arrived in.

    A StreamReader needs a task that reads it, so every answer woke that task one loop
    turn before anything could use it; here `on_frame(message, buffers)` runs from
    `data_received` itself (one event-loop turn less per batch at c=1,
    docs/performance.md). The first frame (the worker's `Ready` or `Failed`) is
    awaited with `first()`; frames after it wait until `start` names the handler.
    A frame that does not parse, or that `on_frame` rejects with `FrameError`, goes to
    `on_broken` and nothing more is read. `closed` is done when the socket is.
    """

    def __init__(self, decoder: msgspec.msgpack.Decoder[M]) -> None:
        self._decoder = decoder
        self._buf = bytearray()
        self._first: asyncio.Future[Frame[M]] = asyncio.get_running_loop().create_future()
        self._early: deque[Frame[M]] = deque()
        self._on_frame: Any = None
        self._on_broken: Any = None
        self.broken = False
        self._error: FrameError | None = None  # broke before `start`: reported by it
        self.transport: asyncio.Transport | None = None
        self.closed: asyncio.Future[None] = self._first.get_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def first(self) -> asyncio.Future[Frame[M]]:
        """The first frame; ConnectionError when the socket closes before it, FrameError
        when it does not parse."""
        return self._first

    def start(self, on_frame: Any, on_broken: Any) -> None:
        """From now on frames go to `on_frame(message, buffers)` (any that came early first);
        a bad one goes to `on_broken(FrameError)`."""
        self._on_frame, self._on_broken = on_frame, on_broken
        while self._early and not self.broken:
            self._deliver(self._early.popleft())
        if self._error is not None:  # broke before there was anyone to tell
            on_broken(self._error)

    def data_received(self, data: bytes) -> None:
        if self.broken:
            return
        buf: bytes | bytearray = data
        if self._buf:
            self._buf += data
            buf = self._buf
        size = len(buf)
        offset = 0
        while size - offset >= 4:
            (total,) = _TOTAL.unpack_from(buf, offset)
            end = offset + 4 + total
            if total > MAX_FRAME or end > size:
                if total > MAX_FRAME:
                    self._fail(FrameError(f"a frame declares {total} bytes, over the limit"))
                    return
                break
            body = buf[offset + 4 : end]  # a copy: the frame's buffers outlive this read
            offset = end
            try:
                frame = decode_frame(body, self._decoder)
            except FrameError as exc:
                self._fail(exc)
                return
            self._deliver(frame)
            if self.broken:
                return
        if buf is self._buf:
            if offset:
                del self._buf[:offset]
        elif offset < size:
            self._buf = bytearray(memoryview(buf)[offset:])

    def _deliver(self, frame: Frame[M]) -> None:
        if not self._first.done():
            self._first.set_result(frame)
        elif self._on_frame is None:
            self._early.append(frame)
        else:
            try:
                self._on_frame(*frame)
            except FrameError as exc:
                self._fail(exc)

    def _fail(self, exc: FrameError) -> None:
        self.broken = True
        self._buf = bytearray()
        if not self._first.done():
            self._first.set_exception(exc)
        elif self._on_broken is not None:
            self._on_broken(exc)
        else:
            self._error = exc

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._first.done():
            self._first.set_exception(ConnectionError("the worker closed its socket"))
        if not self.closed.done():
            self.closed.set_result(None)


class BlockingChannel(Generic[M]):
    """One process's side of the socket, with plain blocking reads and writes.

    `decoder` names the messages that may arrive here. While a stream runs, frames
    that arrive are parked (`cancelled` reads ahead to spot a `Cancel`) and handed
    out by `recv` afterwards, in order.
    """

    def __init__(self, sock: socket.socket, decoder: msgspec.msgpack.Decoder[M]) -> None:
        self._sock = sock
        self._decoder = decoder
        self._parked: deque[Frame[M]] = deque()
        self._ahead = bytearray()  # bytes read past the last frame handed out
        # Poll this long before blocking for the next read (serving/polling.py); None: block.
        self.poll: PollWindow | None = None
        # Whether the next wait polls: the worker arms it after answering a lone request
        # (`Worker.run`); after a batch of several, the server is busy and the next frame
        # is not imminent enough to spin for (the spinning took CPU the clients needed).
        self.poll_armed = True
        self._poller = select.poll()
        self._poller.register(sock.fileno(), select.POLLIN)

    def cancelled(self, stream_id: int) -> bool:
        """Read whatever has arrived without blocking; True if it cancels `stream_id`."""
        found = False
        while self._ahead or select.select([self._sock], [], [], 0)[0]:
            frame = self._recv_frame()
            if frame is None:
                return True  # the server is gone: nobody is listening
            message = frame[0]
            if isinstance(message, Cancel):
                found = found or message.id == stream_id
            else:
                self._parked.append(frame)
        return found

    def _read_exactly(self, n: int) -> bytes | bytearray | None:
        """`n` bytes: from what an earlier read brought along, else from the socket.

        One `recv` of up to `_READ_AHEAD` bytes usually brings a frame's prefix and body
        together (a worker made two reads per request before: 4 bytes, then the rest).
        """
        ahead = self._ahead
        if len(ahead) >= n:
            chunk = bytes(ahead[:n])
            del ahead[:n]
            return chunk
        if n - len(ahead) > _READ_AHEAD:  # a large frame: read it straight into its buffer
            buf = bytearray(n)
            view = memoryview(buf)
            got = len(ahead)
            view[:got] = ahead
            ahead.clear()
            while got < n:
                count = self._sock.recv_into(view[got:], n - got)
                if count == 0:
                    return None
                got += count
            return buf
        while len(ahead) < n:
            data = self._recv_some()
            if not data:
                return None
            ahead += data
        chunk = bytes(ahead[:n])
        del ahead[:n]
        return chunk

    def _recv_some(self) -> bytes:
        """One read of up to `_READ_AHEAD` bytes, polled for first when `poll` says so."""
        poll = self.poll
        sock = self._sock
        if poll is None or not self.poll_armed:
            return sock.recv(_READ_AHEAD)
        started = time.perf_counter()
        if poll.window:
            wait_readable(self._poller, poll.window)  # then this read does not sleep
        data = sock.recv(_READ_AHEAD)
        poll.learn(time.perf_counter() - started)
        return data

    def recv(self) -> Frame[M] | None:
        """Next frame (a `Cancel` for a stream already over is skipped), or None at EOF."""
        while self._parked:
            frame = self._parked.popleft()
            if not isinstance(frame[0], Cancel):
                return frame
        return self._recv_frame()

    def _recv_frame(self) -> Frame[M] | None:
        prefix = self._read_exactly(4)
        if prefix is None:
            return None
        (total,) = _TOTAL.unpack(prefix)
        _check_total(total)
        body = self._read_exactly(total)
        if body is None:
            return None
        return decode_frame(body, self._decoder)

    def send(self, message: Message, buffers: Sequence[Any] = ()) -> None:
        chunks = encode_frame(message, buffers)
        total = sum(len(c) for c in chunks)
        sent = self._sock.sendmsg(chunks) if len(chunks) <= 64 else 0
        if sent < total:  # a partial send (large frame): finish the rest in one go
            self._sock.sendall(b"".join(chunks)[sent:])

    def close(self) -> None:
        self._sock.close()
