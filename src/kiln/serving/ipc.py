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
from collections import deque
from collections.abc import Sequence
from typing import Any, Generic, TypeVar

import msgspec

from kiln.serving.messages import Cancel, Message

_TOTAL = struct.Struct("!I")
_HEAD = struct.Struct("!II")  # header length, buffer count
MAX_FRAME = 1 << 31
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

    def cancelled(self, stream_id: int) -> bool:
        """Read whatever has arrived without blocking; True if it cancels `stream_id`."""
        found = False
        while select.select([self._sock], [], [], 0)[0]:
            frame = self._recv_frame()
            if frame is None:
                return True  # the server is gone: nobody is listening
            message = frame[0]
            if isinstance(message, Cancel):
                found = found or message.id == stream_id
            else:
                self._parked.append(frame)
        return found

    def _read_exactly(self, n: int) -> bytearray | None:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            count = self._sock.recv_into(view[got:], n - got)
            if count == 0:
                return None
            got += count
        return buf

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
