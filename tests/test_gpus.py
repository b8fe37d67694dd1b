"""GPU assignment: each replica gets its own devices through CUDA_VISIBLE_DEVICES, from the
machine's inventory (KILN_GPUS stands in for real GPUs); a request for GPUs that do not
exist leaves the API `compute unavailable` instead of failing the server."""

from __future__ import annotations

from pathlib import Path

import httpx
from support import write

from kiln.serving.gpus import GpuAllocator

HANDLER = """
import os


def predict(payload, context):
    return {"devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "pid": os.getpid()}
"""


def test_allocator_hands_out_whole_devices_once() -> None:
    gpus = GpuAllocator(["0", "1", "2"])
    first, second = gpus.acquire(2), gpus.acquire(2)
    assert first == ["0", "1"] and second is None
    assert "only 1 of 3 are free" in gpus.shortage(2)
    gpus.release(first)
    assert gpus.acquire(3) == ["0", "1", "2"]
    assert "this machine has 3" in gpus.shortage(4)


def test_replicas_get_their_own_gpus_and_missing_ones_are_reported(
    tmp_path: Path, serve_project
) -> None:
    write(tmp_path / "p" / "h.py", HANDLER)
    write(
        tmp_path / "p" / "kiln.yaml",
        "- kind: api\n  name: two\n  python: {handler: h.py}\n"
        "  compute: {gpu: 1, min_replicas: 2, max_replicas: 2}\n"
        "- kind: api\n  name: greedy\n  python: {handler: h.py}\n"
        "  compute: {gpu: 4}\n"
        "- kind: api\n  name: cpu-only\n  python: {handler: h.py}\n",
    )
    server = serve_project(tmp_path / "p", KILN_GPUS="0,1")
    devices = {}
    for pid in server.worker_pids():
        environ = dict(
            item.split("=", 1)
            for item in Path(f"/proc/{pid}/environ").read_text().split("\0")
            if "=" in item
        )
        devices.setdefault(environ["KILN_API"], []).append(environ.get("CUDA_VISIBLE_DEVICES"))
    assert sorted(devices["two"]) == ["0", "1"], devices
    # No device for an API that asked for none (the environment may already hide GPUs: "").
    assert devices["cpu-only"] in ([None], [""]) and "greedy" not in devices
    assert server.client.post("/two", json=1).status_code == 200

    refused = server.client.post("/greedy", json=1)
    assert refused.status_code == 503
    assert "compute unavailable" in refused.json()["error"]["message"]
    assert "asks for 4 GPU(s)" in refused.json()["error"]["message"]
    assert refused.headers["Retry-After"] == "30"
    apis = httpx.get(f"{server.management_url}/apis").json()["apis"]
    status = {a["name"]: a["status"] for a in apis}
    assert status == {"two": "live", "greedy": "compute unavailable", "cpu-only": "live"}
