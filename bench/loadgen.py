"""Python side of the C load generator (bench/loadgen.c): build it, run it, read its answer.

A Python client spends more CPU per request than the servers we measure; on a 2-core box
that would hide the server's cost. bench/loadgen.c is a one-thread epoll client that sends a
prebuilt HTTP/1.1 keep-alive request and reads the answer by Content-Length (or chunks).
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

HERE = Path(__file__).parent
BINARY = HERE / ".build" / "loadgen"


def build() -> Path:
    """Compile bench/loadgen.c (gcc -O2) into bench/.build/loadgen; returns its path."""
    subprocess.run(["bash", str(HERE / "build_loadgen.sh")], check=True)
    return BINARY


def run_load(
    url: str,
    body: bytes,
    concurrency: int,
    duration: float,
    warmup: float = 0.5,
    content_type: str = "application/json",
    timeout: float = 30.0,
) -> dict:
    """One closed-loop run; the loadgen's JSON answer (requests, rps, p50_ms, p99_ms, ...)."""
    if not BINARY.exists():
        build()
    with tempfile.NamedTemporaryFile(suffix=".body") as f:
        f.write(body)
        f.flush()
        done = subprocess.run(
            [
                str(BINARY),
                "--url",
                url,
                "--body-file",
                f.name,
                "--concurrency",
                str(concurrency),
                "--duration",
                str(duration),
                "--warmup",
                str(warmup),
                "--content-type",
                content_type,
                "--timeout",
                str(timeout),
            ],
            capture_output=True,
            text=True,
            timeout=warmup + duration + timeout + 30,
        )
    if done.returncode != 0:
        raise RuntimeError(f"loadgen failed ({done.returncode}): {done.stderr.strip()}")
    return json.loads(done.stdout)
