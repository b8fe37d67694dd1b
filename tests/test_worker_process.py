"""The one worker-process class: only its channel passes, and any line length is logged.

Unit level: WorkerProcess runs a tiny Python program, no server, no HTTP.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys

import pytest

from kiln.handlers.pipeline import build_pipeline
from kiln.sandbox import LaunchSpec, probe
from kiln.sandbox.policy import SandboxPolicy, base_env
from kiln.sandbox.spec import EXIT_OUT_OF_MEMORY
from kiln.serving.messages import Batch, RequestItem
from kiln.serving.process import MAX_LINE_BYTES, WorkerProcess
from kiln.serving.types import WorkerSpec
from kiln.serving.worker import Worker, worker_channel

LIST_FDS = (
    "import os\n"
    "fds = sorted(int(n) for n in os.listdir('/proc/self/fd'))\n"
    "print(' '.join(str(fd) for fd in fds if os.path.exists(f'/proc/self/fd/{fd}')))\n"
)


def run(spec: LaunchSpec) -> tuple[int, list[str]]:
    lines: list[str] = []

    async def go() -> int:
        process = WorkerProcess(spec, lines.append)
        await process.spawn()
        code = await process.wait()
        await process.drain_output()
        return code

    return asyncio.run(go()), lines


@pytest.mark.parametrize("sandboxed", [False, True], ids=["plain", "sandboxed"])
def test_a_worker_gets_its_channel_and_nothing_else(sandboxed: bool, tmp_path) -> None:
    if sandboxed and not probe().available:
        if os.environ.get("CI") == "true":
            pytest.fail("CI must run the sandbox: " + "; ".join(probe().problems))
        pytest.skip("the sandbox is not available here: " + "; ".join(probe().problems))
    listening = socket.create_server(("127.0.0.1", 0))
    listening.set_inheritable(True)  # even an inheritable socket must not reach the worker
    parent, child = socket.socketpair()
    channel = child.fileno()
    try:
        policy = SandboxPolicy(enabled=sandboxed, home=tmp_path)
        spec = policy.launch(
            [sys.executable, "-c", LIST_FDS],
            base_env(),
            cwd=str(tmp_path),
            pass_fds=(child.fileno(),),
        )
        code, lines = run(spec)
    finally:
        for s in (listening, parent, child):
            s.close()
    assert code == 0, lines
    fds = {int(fd) for fd in lines[-1].split()}
    # stdin, stdout, stderr, the channel; listdir's own descriptor is gone when checked.
    assert fds == {0, 1, 2, channel}, lines


def test_a_300_kb_line_is_cut_and_later_lines_still_arrive(tmp_path) -> None:
    program = "print('x' * 300_000); print('after'); print('y' * 70_000, end='')"
    spec = LaunchSpec(argv=[sys.executable, "-c", program], env=base_env(), cwd=str(tmp_path))
    code, lines = run(spec)
    assert code == 0
    assert len(lines) == 3, [line[:40] for line in lines]
    assert lines[0].startswith("x" * MAX_LINE_BYTES)
    assert lines[0].endswith(f"[{300_000 - MAX_LINE_BYTES} more bytes of this line not logged]")
    assert lines[1] == "after"
    assert lines[2].endswith(f"[{70_000 - MAX_LINE_BYTES} more bytes of this line not logged]")


CONNECT = (
    "import socket, sys\n"
    "try:\n"
    "    socket.create_connection(('127.0.0.1', int(sys.argv[1])), 2).close()\n"
    "    print('connected')\n"
    "except OSError as exc:\n"
    "    print('refused', type(exc).__name__)\n"
)


@pytest.mark.parametrize("network", ["none", "egress"])
def test_network_none_is_loopback_of_its_own_and_egress_is_the_hosts(
    network: str, tmp_path
) -> None:
    if not probe().available:
        if os.environ.get("CI") == "true":
            pytest.fail("CI must run the sandbox: " + "; ".join(probe().problems))
        pytest.skip("the sandbox is not available here: " + "; ".join(probe().problems))
    listening = socket.create_server(("127.0.0.1", 0))
    port = listening.getsockname()[1]
    try:
        policy = SandboxPolicy(enabled=True, home=tmp_path)
        spec = policy.launch(
            [sys.executable, "-c", CONNECT, str(port)],
            base_env(),
            cwd=str(tmp_path),
            pass_fds=(),
            network=network,
        )
        code, lines = run(spec)
    finally:
        listening.close()
    assert code == 0, lines
    assert lines[-1] == ("connected" if network == "egress" else "refused ConnectionRefusedError")


def test_a_workers_cgroup_goes_with_it_and_stale_ones_are_swept(tmp_path) -> None:
    from kiln.sandbox import cgroups
    from kiln.sandbox.spec import Limits

    version = probe().cgroup
    if version is None:
        pytest.skip("cgroups are not writable here (not root, or a read-only /sys)")
    spec = LaunchSpec(
        argv=[sys.executable, "-c", "print('hi')"],
        env=base_env(),
        cwd=str(tmp_path),
        limits=Limits(mem_bytes=256 << 20),
        name="unit-gone",
    )
    code, _ = run(spec)
    assert code == 0
    for base in cgroups._bases():
        assert not [f for f in base.iterdir() if f.name.startswith(f"unit-gone-{os.getpid()}-")]
    # A group whose server pid is gone (a SIGKILLed server) is removed by the sweep.
    dead = 2**22 + 12345  # above pid_max's default: never a live process
    stale = cgroups.create("unit-stale", Limits(), version)
    for folder in stale.folders:
        folder.rename(folder.with_name(f"unit-stale-{dead}-0"))
    assert cgroups.sweep_stale() >= len(stale.folders)
    for base in cgroups._bases():
        assert not (base / f"unit-stale-{dead}-0").exists()


def test_exit_code_out_of_memory_reads_as_an_oom_kill(tmp_path) -> None:
    """Where no cgroup can be made, compute.mem is RLIMIT_DATA: the worker sees a
    MemoryError and exits with EXIT_OUT_OF_MEMORY, reported like the kernel's kill."""
    spec = SandboxPolicy(enabled=False, home=tmp_path).launch(
        [sys.executable, "-c", f"raise SystemExit({EXIT_OUT_OF_MEMORY})"],
        base_env(),
        cwd=str(tmp_path),
        pass_fds=(),
    )

    async def go() -> tuple[int, bool]:
        process = WorkerProcess(spec, lambda line: None)
        await process.spawn()
        code = await process.wait()
        return code, process.oom_killed()

    assert asyncio.run(go()) == (EXIT_OUT_OF_MEMORY, True)


def test_a_memory_error_in_user_code_ends_the_realtime_worker(tmp_path) -> None:
    """Not one request's 500: the memory limit was hit, so the worker must end (and be
    restarted) rather than go on near its limit."""
    (tmp_path / "h.py").write_text(
        "class Hungry:\n    def predict(self, payload):\n        raise MemoryError()\n"
    )
    spec = WorkerSpec(
        api="hungry", version=None, runtime="python", handler=f"{tmp_path}/h.py:Hungry"
    )
    pipeline = build_pipeline(spec)
    parent, child = socket.socketpair()
    try:
        worker = Worker(worker_channel(child), spec, pipeline)
        with pytest.raises(MemoryError):
            worker.handle_batch(Batch(1, [RequestItem("r1")]), [memoryview(b"0")])
    finally:
        parent.close()
        child.close()


WRONG_LENGTH = """
class WrongLength:
    def predict_batch(self, payloads, contexts):
        if payloads[0] == "short":
            return payloads[:-1]
        if payloads[0] == "long":
            return payloads + ["extra"]
        return {"not": "a list"}

    def predict(self, payload, context):
        return payload
"""


@pytest.mark.parametrize(
    ("first", "returned"),
    [("short", "2 results"), ("long", "4 results"), ("dict", "a dict, not a list,")],
)
def test_predict_batch_with_the_wrong_count_fails_each_request_and_says_why_in_the_log(
    tmp_path, capsys, first: str, returned: str
) -> None:
    (tmp_path / "h.py").write_text(WRONG_LENGTH)
    spec = WorkerSpec(
        api="wrong", version=None, runtime="python", handler=f"{tmp_path}/h.py:WrongLength"
    )
    parent, child = socket.socketpair()
    try:
        worker = Worker(worker_channel(child), spec, build_pipeline(spec))
        items = [RequestItem(f"req-{n}") for n in range(3)]
        bodies = [f'"{first}"'.encode(), b'"b"', b'"c"']
        reply, _ = worker.handle_batch(Batch(7, items), [memoryview(body) for body in bodies])
    finally:
        parent.close()
        child.close()
    errors = [item.error for item in reply.items]
    assert [e.status if e else None for e in errors] == [500, 500, 500]
    assert all(
        e is not None
        and e.message
        == f"predict_batch returned {returned} for 3 requests; it must return a "
        f"list with one result per request, in order"
        for e in errors
    )
    log = capsys.readouterr().err
    assert (
        f"API 'wrong': predict_batch returned {returned} for 3 requests "
        f"(request ids req-0, req-1, req-2); each of them got a 500"
    ) in log


def test_the_worker_ignores_sigterm_and_exits_when_its_channel_closes(tmp_path) -> None:
    """systemd sends SIGTERM to every process: the worker must leave stopping to the
    server, which drains its requests and then closes the channel."""
    parent, child = socket.socketpair()
    spec = SandboxPolicy(enabled=False, home=tmp_path).launch(
        [sys.executable, "-m", "kiln.serving.worker", str(child.fileno())],
        base_env(),
        cwd=str(tmp_path),
        pass_fds=(child.fileno(),),
    )

    async def go() -> tuple[int | None, int | None]:
        process = WorkerProcess(spec, lambda line: None)
        await process.spawn()
        child.close()
        await asyncio.sleep(1.0)  # past the interpreter's start, into the worker's main()
        assert process.pid is not None
        os.kill(process.pid, signal.SIGTERM)
        await asyncio.sleep(0.5)
        after_sigterm = process.returncode
        parent.close()  # the stop message: EOF before the init frame
        return after_sigterm, await process.stop(10)

    alive, code = asyncio.run(go())
    assert alive is None
    assert code == 2  # it returned by itself (no init frame), not killed (-9) or -15


def test_which_load_failures_are_permanent(tmp_path) -> None:
    from kiln.runtimes.base import ModelLoadError
    from kiln.serving.worker_load import permanent_load_failure

    spec = WorkerSpec(api="a", version=None, runtime="onnx", model_path=str(tmp_path / "m.onnx"))
    assert permanent_load_failure(SyntaxError("invalid syntax"), spec)
    assert permanent_load_failure(ModuleNotFoundError("No module named 'nope'"), spec)
    two = ModelLoadError("the model has 2 signatures ... set signature_key")
    assert not permanent_load_failure(two, spec)  # its file is not there: it may come
    (tmp_path / "m.onnx").write_bytes(b"x")
    assert permanent_load_failure(two, spec)
    assert not permanent_load_failure(RuntimeError("the database was not up"), spec)
    assert not permanent_load_failure(MemoryError(), spec)
