"""`compute.target_cpu_utilization` from measured CPU: a real worker process burns CPU,
the autoscaler's loop measures it (cgroup or /proc) and asks for more replicas."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections import deque
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from kiln.config.blocks import Autoscaling, Compute
from kiln.control.scaling import AutoscaleLoop, CpuMeter
from kiln.sandbox.policy import SandboxPolicy
from kiln.serving.replica import Replica
from kiln.serving.types import InferenceRequest, WorkerSpec

BURN = """
import time


class Burn:
    def predict(self, payload, context):
        end = time.process_time() + payload
        while time.process_time() < end:
            pass
        return payload
"""


class Log:
    def __init__(self) -> None:
        self.records: list[tuple[str, dict[str, Any]]] = []

    def write(self, name: str, record: dict[str, Any]) -> None:
        self.records.append((name, record))


def start_replica(tmp_path: Path) -> Replica:
    (tmp_path / "h.py").write_text(BURN)
    spec = WorkerSpec(api="burn", version=None, runtime="python", handler="h.py:Burn")
    policy = SandboxPolicy(enabled=False, home=tmp_path)

    def launch(argv: list[str], pass_fds: tuple[int, ...]) -> Any:
        env = {k: v for k, v in os.environ.items() if k in ("PATH", "PYTHONPATH", "HOME")}
        return policy.launch(argv, env, cwd=str(tmp_path), pass_fds=pass_fds)

    return Replica(spec, launch=launch, log_line=lambda line: None)


def served_with(replica: Replica, scaled_to: list[int]) -> SimpleNamespace:
    """What AutoscaleLoop reads of a ServedApi, around one real replica."""
    in_flight = [0]

    async def scale(replicas: int) -> None:
        scaled_to.append(replicas)

    return SimpleNamespace(
        name="burn",
        api=SimpleNamespace(
            # Half a core: one busy core is 200%, so a machine shared with other tests
            # (the worker getting half a core) still reads 100%, over the target of 50.
            compute=Compute(cpu=0.5, min_replicas=1, max_replicas=4, target_cpu_utilization=50),
            autoscaling=Autoscaling(
                window="10s",
                target_replica_concurrency=4,  # the concurrency alone asks for one replica
                upscale_stabilization_period="0s",
            ),
        ),
        max_batch_size=1,
        replica_bounds=(1, 4),
        state="ready",
        slots=[SimpleNamespace(replica=replica)],
        in_flight=in_flight,
        in_flight_total=lambda: in_flight[0],
        last_request_at=time.monotonic(),
        scaling_events=deque(),
        scale=scale,
    )


def test_a_replica_burning_cpu_over_its_target_gets_company(tmp_path: Path) -> None:
    scaled_to: list[int] = []

    async def go() -> tuple[Any, float | None, float | None]:
        replica = start_replica(tmp_path)
        await replica.start(60)
        served = served_with(replica, scaled_to)
        loop = AutoscaleLoop(served, Log(), tick_s=0.25)
        before = replica.cpu_seconds()

        async def load() -> None:  # a bounded load: 8 requests of 0.3 s of CPU, one at a time
            for n in range(8):
                served.in_flight[0] = 1
                request = InferenceRequest("burn", None, f"r{n}", b"0.3")
                await replica.submit_batch([request], timeout=30)
            served.in_flight[0] = 0

        task = asyncio.create_task(load())
        decisions = []
        while not task.done():
            await asyncio.sleep(0.25)
            decisions.append(await loop.tick())
        await task
        used = replica.cpu_seconds()
        await replica.stop(5)
        last = next(d for d in reversed(decisions) if d is not None)
        return last, loop.cpu_utilization(), (used or 0) - (before or 0)

    decision, cpu, used = asyncio.run(go())
    assert used >= 8 * 0.3 * 0.9  # the worker's own CPU time was measured, not the server's
    assert cpu is not None and cpu > 50
    assert decision.replicas >= 2, decision
    assert decision.reason.startswith("cpu "), decision
    assert scaled_to and scaled_to[0] == 2, scaled_to


def test_the_meter_is_a_percent_of_compute_cpu_per_replica() -> None:
    class Fake:
        def __init__(self, seconds: float) -> None:
            self.seconds = seconds

        def cpu_seconds(self) -> float:
            return self.seconds

    meter = CpuMeter()
    a, b = Fake(1.0), Fake(5.0)
    assert meter.sample([a, b], cores=0.5, now=10.0) is None  # a first sample is a baseline
    a.seconds, b.seconds = 1.5, 5.25  # 0.5 s and 0.25 s of CPU in 2 s, on half a core each
    assert meter.sample([a, b], cores=0.5, now=12.0) == (50.0 + 25.0) / 2
    c = Fake(0.0)  # a restarted worker starts its own baseline
    assert meter.sample([c], cores=1.0, now=13.0) is None


def test_without_a_cgroup_the_worker_process_tree_is_summed(tmp_path: Path) -> None:
    """Without a cgroup the CPU of the worker's children counts too (bubblewrap's tree)."""
    from kiln.sandbox import LaunchSpec
    from kiln.serving.process import WorkerProcess

    program = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', "
        "'import time\\nend = time.process_time() + 1.0\\n"
        "while time.process_time() < end: pass\\ntime.sleep(30)'])\n"
        "time.sleep(30)\n"
    )
    spec = LaunchSpec(argv=[sys.executable, "-c", program], env=dict(os.environ), cwd=str(tmp_path))

    async def go() -> float | None:
        process = WorkerProcess(spec, lambda line: None)
        await process.spawn()
        try:
            deadline = time.monotonic() + 20
            used = process.cpu_seconds()
            while (used or 0) < 1.0 and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
                used = process.cpu_seconds()
            return used
        finally:
            assert process.pid is not None
            os.killpg(process.pid, signal.SIGKILL)  # it leads a session (and group) of its own
            await process.wait()

    used = asyncio.run(go())
    assert used is not None and used >= 1.0


def test_a_cgroup_reads_its_own_usage(tmp_path: Path) -> None:
    """v2: cpu.stat usage_usec; v1: cpuacct.usage in ns where the cpu and cpuacct
    controllers share a folder; elsewhere None (the process tree is read instead)."""
    from kiln.serving.process import _group_cpu_seconds

    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.stat").write_text("usage_usec 2500000\nuser_usec 2000000\nsystem_usec 500000\n")
    assert _group_cpu_seconds([v2], "v2") == 2.5
    memory, pids, cpu = (tmp_path / n for n in ("memory", "pids", "cpu"))
    for folder in (memory, pids, cpu):
        folder.mkdir()
    assert _group_cpu_seconds([memory, pids, cpu], "v1") is None
    (cpu / "cpuacct.usage").write_text("1250000000\n")
    assert _group_cpu_seconds([memory, pids, cpu], "v1") == 1.25
