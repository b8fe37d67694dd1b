"""A minimal HTTP/1.1 keep-alive load generator, so the client costs as little as possible.

httpx is a fine client but spends more CPU per request than the servers we
measure; on a 2-core box that would hide the server's cost. This one sends a
prebuilt request and reads the answer by Content-Length, nothing more.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass


@dataclass
class LoadResult:
    requests: int
    seconds: float
    latencies_ms: list[float]
    errors: int

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))] if ordered else 0.0


def build_request(host: str, port: int, path: str, body: bytes) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def _connection(host, port, request, stop_at, latencies, errors):
    reader, writer = await asyncio.open_connection(host, port)
    count = 0
    try:
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            latencies.append((time.perf_counter() - started) * 1000)
            if not head.startswith(b"HTTP/1.1 200"):
                errors[0] += 1
            count += 1
    finally:
        writer.close()
    return count


async def run_load(url: str, body: bytes, concurrency: int, duration: float) -> LoadResult:
    rest = url.split("://", 1)[1]
    hostport, _, path = rest.partition("/")
    host, port = hostport.rsplit(":", 1)
    request = build_request(host, int(port), "/" + path, body)
    latencies: list[float] = []
    errors = [0]
    started = time.perf_counter()
    stop_at = started + duration
    counts = await asyncio.gather(
        *(
            _connection(host, int(port), request, stop_at, latencies, errors)
            for _ in range(concurrency)
        )
    )
    return LoadResult(sum(counts), time.perf_counter() - started, latencies, errors[0])
