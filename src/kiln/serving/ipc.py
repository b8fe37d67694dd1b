"""Framing between the server and its worker processes.

A frame is `[u32 total][u32 header_len][msgpack header][buffer 0][buffer 1]...`
with the buffer lengths listed in the header under "b". Bodies and tensors
travel as raw buffers, never pickled and never re-encoded: the worker parses
the client's JSON once and the server forwards the worker's bytes as they are.
"""

from __future__ import annotations

import asyncio
import select
import socket
import struct
from collections import deque
from collections.abc import Sequence
from typing import Any

import msgpack

_PREFIX = struct.Struct("!II")
MAX_FRAME = 1 << 31


def encode_frame(header: dict[str, Any], buffers: Sequence[bytes] = ()) -> list[bytes]:
    """Return the frame as a list of chunks, so large buffers are written without a copy."""
    header = dict(header)
    header["b"] = [len(b) for b in buffers]
    packed = msgpack.packb(header, use_bin_type=True)
    total = 4 + len(packed) + sum(header["b"])
    return [_PREFIX.pack(total, len(packed)), packed, *buffers]


def decode_frame(
    payload: bytes | bytearray | memoryview,
) -> tuple[dict[str, Any], list[memoryview]]:
    """Split a frame body (everything after the total length) into header and buffers."""
    view = memoryview(payload)
    (header_len,) = struct.unpack_from("!I", view, 0)
    header = msgpack.unpackb(view[4 : 4 + header_len], raw=False)
    buffers: list[memoryview] = []
    offset = 4 + header_len
    for length in header.pop("b", ()):
        buffers.append(view[offset : offset + length])
        offset += length
    return header, buffers


async def read_frame(reader: asyncio.StreamReader) -> tuple[dict[str, Any], list[memoryview]]:
    """Read one frame; raises asyncio.IncompleteReadError when the peer is gone."""
    prefix = await reader.readexactly(4)
    (total,) = struct.unpack("!I", prefix)
    body = await reader.readexactly(total)
    return decode_frame(body)


class BlockingChannel:
    """The worker's side of the socket: plain blocking reads and writes.

    While a stream runs, frames that arrive are parked here (`cancelled` reads
    ahead to spot a cancel) and handed out by `recv` afterwards, in order.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._parked: deque[tuple[dict[str, Any], list[memoryview]]] = deque()

    def cancelled(self, stream_id: int) -> bool:
        """Read whatever has arrived without blocking; True if it cancels `stream_id`."""
        found = False
        while select.select([self._sock], [], [], 0)[0]:
            frame = self._recv_frame()
            if frame is None:
                return True  # the server is gone: nobody is listening
            header = frame[0]
            if header.get("op") == "cancel":
                found = found or header.get("id") == stream_id
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

    def recv(self) -> tuple[dict[str, Any], list[memoryview]] | None:
        """Next frame, or None when the server closed the connection."""
        while self._parked:
            frame = self._parked.popleft()
            if frame[0].get("op") != "cancel":
                return frame
        return self._recv_frame()

    def _recv_frame(self) -> tuple[dict[str, Any], list[memoryview]] | None:
        prefix = self._read_exactly(4)
        if prefix is None:
            return None
        (total,) = struct.unpack("!I", prefix)
        body = self._read_exactly(total)
        if body is None:
            return None
        return decode_frame(body)

    def send(self, header: dict[str, Any], buffers: Sequence[bytes] = ()) -> None:
        chunks = encode_frame(header, list(buffers))
        total = sum(len(c) for c in chunks)
        sent = self._sock.sendmsg(chunks) if len(chunks) <= 64 else 0
        if sent < total:  # a partial send (large frame): finish the rest in one go
            self._sock.sendall(b"".join(chunks)[sent:])

    def close(self) -> None:
        self._sock.close()
