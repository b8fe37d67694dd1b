"""Limits that keep a hostile tenant from exhausting the machine, against a real `kiln server`.

Replica counts over a cap (the machine's, the API's max_replicas, the user's plan) are a
400 naming the cap, on deploy and on the management API, and start nothing; a user's
upload over their plan is refused while it streams, an archive that unpacks past the plan
is refused while unpacking, and neither leaves anything on disk; `network: egress` needs
a plan that allows it.
"""

from __future__ import annotations

import gzip
import io
import os
import socket
import tarfile
import time
from pathlib import Path

import httpx
import orjson
import pytest
from daemon import Daemon
from support import write

HANDLER = "def predict(payload, context):\n    return {'echo': payload}\n"
PLANS = """
free:
  max_replicas: 1
  max_replica_mem: 300Mi
  max_upload_bytes: 1Mi
  max_unpacked_bytes: 20Mi
"""


def archive(files: dict[str, bytes], big: tuple[str, int] | None = None) -> bytes:
    """A deploy archive (gzip'd tar) of `files`, plus `big`: a file of that many zero bytes."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=1) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if big is not None:
            info = tarfile.TarInfo(big[0])
            info.size = big[1]
            tar.addfile(info, _Zeros(big[1]))
    return buffer.getvalue()


class _Zeros(io.RawIOBase):
    def __init__(self, size: int) -> None:
        self.left = size

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        self.left -= n
        return bytes(n)


def project(api: str = "echo", extra: str = "") -> dict[str, bytes]:
    """A one-API project; its deployment is named after the API."""
    config = f"- kind: deployment\n  name: {api}\n- kind: api\n  name: {api}\n"
    config += "  python: {handler: h.py:predict}\n" + extra
    return {"kiln.yaml": config.encode(), "h.py": HANDLER.encode()}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("limits")
    home = root / "home"
    write(home / "plans.yaml", PLANS)
    d = Daemon(home)
    d.start()
    made = d.kiln("users", "create", "alice", "-o", "json")
    assert made.returncode == 0, made.stdout + made.stderr
    d.alice = {"x-api-key": orjson.loads(made.stdout)["key"]}
    yield d
    d.stop()


def deploy(d: Daemon, body: bytes | object, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(
        d.management_url + "/deployments",
        content=body,
        headers={**headers, "content-type": "application/gzip"},
        timeout=120,
    )


def incoming(d: Daemon) -> list[str]:
    folder = d.home / "artifacts" / ".incoming"
    return sorted(os.listdir(folder)) if folder.is_dir() else []


def wait_live(d: Daemon, name: str, headers: dict[str, str]) -> dict:
    def live() -> dict | None:
        answer = httpx.get(f"{d.management_url}/apis", headers=headers, timeout=30).json()
        found = {a["name"]: a for a in answer["apis"]}.get(name)
        return found if found and found["status"] == "live" else None

    return d.wait_until(live, timeout=60, what=f"{name} live")


def test_min_worker_over_the_machine_cap_is_a_400_and_starts_nothing(server: Daemon) -> None:
    admin = server.auth
    answer = deploy(server, archive(project()), admin)
    assert answer.status_code == 202, answer.text
    wait_live(server, "echo", admin)
    workers = server.worker_pids()
    url = f"{server.management_url}/models/echo"
    for params in (
        {"min_worker": 1000},
        {"min_worker": 1000, "synchronous": "true"},
        {"min_worker": 1, "max_worker": 1000},
    ):
        refused = httpx.put(url, params=params, headers=admin, timeout=30)
        assert refused.status_code == 400, refused.text
        message = refused.json()["message"]
        assert "cap of" in message and "cores" in message, message
        assert "1000" in message, message
    time.sleep(1.0)  # a worker the refused request had started would show by now
    assert sorted(server.worker_pids()) == sorted(workers)
    # kiln.yaml asking for more replicas than the machine holds: a 400 naming the cap, too.
    compute = "  compute: {min_replicas: 50, max_replicas: 60}\n"
    many = deploy(server, archive(project("many", compute)), admin)
    assert many.status_code == 400, many.text
    assert "compute.min_replicas=50" in many.text and "cores" in many.text
    assert sorted(server.worker_pids()) == sorted(workers)


def test_the_plans_max_replicas_bounds_deploy_and_put(server: Daemon) -> None:
    alice = server.alice
    two = deploy(server, archive(project("two", "  compute: {min_replicas: 2}\n")), alice)
    assert two.status_code == 400, two.text
    assert "'free' plan's max_replicas" in two.json()["message"]
    wide = deploy(server, archive(project("wide", "  compute: {max_replicas: 5}\n")), alice)
    assert wide.status_code == 400 and "compute.max_replicas=5" in wide.text, wide.text
    ok = deploy(server, archive(project("mine")), alice)
    assert ok.status_code == 202, ok.text
    api = wait_live(server, "alice.mine", alice)
    assert api["replicas"]["max"] == 1  # the default max_replicas (100) is the plan's 1
    url = f"{server.management_url}/models/alice.mine"
    refused = httpx.put(url, params={"min_worker": 2}, headers=alice, timeout=30)
    assert refused.status_code == 400, refused.text
    assert "the 'free' plan's max_replicas" in refused.json()["message"]
    assert "cap of 1" in refused.json()["message"]
    accepted = httpx.put(url, params={"min_worker": 1, "synchronous": "true"}, headers=alice)
    assert accepted.status_code == 200, accepted.text


def test_a_deploy_refused_by_the_plans_api_count_leaves_nothing(server: Daemon) -> None:
    config = "- kind: deployment\n  name: five\n"
    for i in range(6):  # over the 5 APIs of `free` whatever alice already has
        config += f"- kind: api\n  name: a{i}\n  python: {{handler: h.py:predict}}\n"
    body = archive({"kiln.yaml": config.encode(), "h.py": HANDLER.encode()})
    refused = deploy(server, body, server.alice)
    assert refused.status_code == 403 and "'free' plan allows 5 APIs" in refused.text
    assert not (server.home / "artifacts" / "alice.five").exists()
    assert incoming(server) == []


def test_compute_mem_over_the_plan_is_refused(server: Daemon) -> None:
    body = archive(project("fat", "  compute: {mem: 1Gi}\n"))
    refused = deploy(server, body, server.alice)
    assert refused.status_code == 400, refused.text
    message = refused.json()["message"]
    assert "max_replica_mem" in message and "'free' plan" in message and "300Mi" in message
    assert incoming(server) == []


def test_an_archive_that_unpacks_past_the_plan_is_refused_and_leaves_nothing(
    server: Daemon,
) -> None:
    before = sorted(os.listdir(server.home / "artifacts"))
    bomb = archive(project("bomb"), big=("data.bin", 200 << 20))
    assert len(bomb) < 1 << 20  # under the plan's upload bound: only unpacking can catch it
    started = time.monotonic()
    refused = deploy(server, bomb, server.alice)
    assert refused.status_code == 413, refused.text
    message = refused.json()["message"]
    assert "max_unpacked_bytes" in message and "20 MiB" in message, message
    assert time.monotonic() - started < 10
    assert incoming(server) == []
    assert sorted(os.listdir(server.home / "artifacts")) == before


def test_an_upload_over_the_plan_is_refused_while_it_streams(server: Daemon) -> None:
    # A chunked upload (no Content-Length) that never ends: the 413 must come while it is
    # still being sent, after about the plan's 1 MiB, not after the body.
    url = httpx.URL(server.management_url)
    with socket.create_connection((url.host, url.port), timeout=30) as sock:
        head = (
            f"POST /deployments HTTP/1.1\r\nHost: {url.host}\r\n"
            f"x-api-key: {server.alice['x-api-key']}\r\ncontent-type: application/gzip\r\n"
            "transfer-encoding: chunked\r\n\r\n"
        )
        sock.sendall(head.encode())
        chunk = os.urandom(64 << 10)
        try:
            for _ in range(32):  # 2 MiB, then wait for the answer with the body unfinished
                sock.sendall(b"%x\r\n%b\r\n" % (len(chunk), chunk))
        except OSError:
            pass  # the server stopped reading: its answer is waiting
        answer = b""
        while b"max_upload_bytes" not in answer:
            data = sock.recv(65536)
            if not data:
                break
            answer += data
    assert answer.startswith(b"HTTP/1.1 413"), answer[:300]
    assert b"the 'free' plan's max_upload_bytes" in answer, answer[:300]
    server.wait_until(lambda: incoming(server) == [], timeout=10, what=".incoming emptied")
    # With a Content-Length over the plan, the answer comes before any byte is read.
    declared = deploy(server, os.urandom(2 << 20), server.alice)
    assert declared.status_code == 413 and "the 'free' plan's max_upload_bytes" in declared.text
    assert incoming(server) == []


def test_network_egress_needs_a_plan_that_allows_it(server: Daemon) -> None:
    body = archive(project("caller", "  network: egress\n"))
    refused = deploy(server, body, server.alice)
    assert refused.status_code == 403, refused.text
    message = refused.json()["message"]
    assert "network: egress" in message and "'free' plan" in message, message
    assert "network_egress" in message
    bad = deploy(server, archive(project("odd", "  network: everywhere\n")), server.alice)
    assert bad.status_code == 400 and "network" in bad.text
    # The admin is never limited.
    admin = deploy(server, body, server.auth)
    assert admin.status_code in (200, 202), admin.text


def test_plans_yaml_is_read_with_sizes(tmp_path: Path) -> None:
    from kiln.control.quotas import load_plans

    write(tmp_path / "plans.yaml", PLANS + "team: {apis: 9, network_egress: true}\n")
    plans = load_plans(tmp_path)
    assert plans["free"].max_replica_mem == 300 << 20 and plans["free"].calls_per_month == 1000
    assert plans["team"].network_egress and plans["team"].max_replicas == 2  # from free
    assert plans["unlimited"].network_egress and plans["unlimited"].max_replicas is None
    write(tmp_path / "plans.yaml", "free: {max_replica: 3}\n")
    with pytest.raises(ValueError, match="max_replica"):
        load_plans(tmp_path)


def test_a_gzip_stream_is_never_read_whole_for_a_header(tmp_path: Path) -> None:
    """A pax header of 64 MiB (tiny once compressed) is refused without reading it."""
    from kiln.control.packaging import unpack_project
    from kiln.errors import InvalidInput

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("a.txt")
        info.pax_headers = {"comment": "x" * (64 << 20)}
        tar.addfile(info, io.BytesIO(b""))
    packed = gzip.compress(buffer.getvalue(), compresslevel=1)
    with pytest.raises(InvalidInput, match="header"):
        unpack_project(packed, tmp_path / "out", max_unpacked=1 << 20)
    assert list(tmp_path.iterdir()) == []


def test_a_users_defaults_are_bounded_by_the_plan() -> None:
    """What a user leaves to the defaults gets the plan's bounds (restores too)."""
    from kiln.config.batch import JobsBlock
    from kiln.config.blocks import Compute
    from kiln.control.ownership import _within_plan
    from kiln.control.quotas import DEFAULT_PLANS

    class Resource:
        def __init__(self, compute: Compute, jobs: JobsBlock | None = None) -> None:
            self.compute, self.jobs = compute, jobs

    free = DEFAULT_PLANS["free"]
    update = _within_plan(Resource(Compute(), JobsBlock()), free)
    compute = update["compute"]
    assert (compute.max_replicas, compute.min_replicas, compute.init_replicas) == (2, 1, 1)
    assert compute.mem == free.max_replica_mem and update["jobs"].max_workers == 2
    assert _within_plan(Resource(Compute(max_replicas=2, mem="1Gi")), free) == {}
    assert _within_plan(Resource(Compute()), DEFAULT_PLANS["unlimited"]) == {}


def test_machine_caps_count_gpus_per_replica(monkeypatch) -> None:
    """compute.gpu: the GPU cap is devices // gpu per replica (KILN_GPUS as the inventory)."""
    from types import SimpleNamespace

    from kiln.serving import gpus
    from kiln.serving.caps import machine_caps

    monkeypatch.setattr(gpus, "_ALLOCATOR", gpus.GpuAllocator(["0", "1", "2", "3"]))
    compute = SimpleNamespace(cpu=0.1, mem=None, gpu=2, max_replicas=100, min_replicas=1)
    caps = machine_caps(compute)
    gpu_cap = [cap for cap in caps if "GPUs" in str(cap)]
    assert gpu_cap and gpu_cap[0].value == 2, caps
