"""A real 2-node Ray cluster on 127.0.0.1 for the Ray backend's tests, one per session.

`ray.cluster_utils.Cluster` starts a head and a second node as this user's own
processes (never `ray stop`, which would kill every Ray process on the machine),
Serve's HTTP proxy runs on every node, and everything is stopped in reverse at
the end. Every wait is bounded. Without Ray, or when the cluster cannot start,
the tests skip; with CI=true they fail instead, so CI cannot pass by skipping.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

# Read when Ray is imported: without it a node advertises the machine's external address
# (a second node may then retry for ever), with it every node stays on 127.0.0.1.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

START_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RayCluster:
    address: str
    http_port: int
    head_node: str
    second_node: str
    cluster: Any = field(default=None, repr=False)  # ray.cluster_utils.Cluster (node kills)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def second_node_object(self) -> Any:
        """The second node's `ray._private.node.Node` (its processes: `all_processes`)."""
        return next(iter(self.cluster.worker_nodes))

    def replace_second_node(self, dead: Any) -> None:
        """After a test killed the second node: stop what is left of it (only the
        processes this cluster started for it) and add a fresh second node, so later
        tests still have two nodes. `second_node` names the new one."""
        import ray

        self.cluster.remove_node(dead, allow_graceful=False)
        _add_second_node(self.cluster)
        _wait(lambda: len(_live_nodes(ray)) == 2, 30, "2 live nodes again")
        self.second_node = _live_nodes(ray)["second"]


def _unavailable(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"the Ray cluster could not start: {reason}")
    pytest.skip(f"the Ray cluster could not start: {reason}")


def _wait(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise TimeoutError(f"{what} within {timeout:g}s")


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[RayCluster]:
    try:
        import ray
        from ray import serve
        from ray.cluster_utils import Cluster
    except ImportError as exc:
        _unavailable(f"ray[serve] is not installed ({exc}); pip install -e .[test]")
        raise  # unreachable: _unavailable raises
    cluster: Any = None
    port = free_port()
    try:
        cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": 2,
                "node_ip_address": "127.0.0.1",
                "include_dashboard": False,
                "resources": {"head": 1},
                # A dead node is declared dead after ~3 s instead of Ray's 15 s (3 s x 5):
                # until then calls to its replicas wait (tests/test_ray_failover.py).
                "_system_config": {
                    "health_check_period_ms": 1000,
                    "health_check_failure_threshold": 3,
                },
            },
        )
        _add_second_node(cluster)
        cluster.wait_for_nodes(timeout=START_TIMEOUT_S)
        ray.init(address=cluster.address, log_to_driver=False)
        assert cluster.address.startswith("127.0.0.1:"), cluster.address
        _wait(lambda: len(_live_nodes(ray)) == 2, 30, "2 live nodes")
        serve.start(proxy_location="EveryNode", http_options={"host": "127.0.0.1", "port": port})
        nodes = _live_nodes(ray)
    except BaseException as exc:  # a timeout too: never leave the cluster running
        if cluster is not None:
            _shutdown(cluster)
        if not isinstance(exc, Exception):
            raise
        _unavailable(repr(exc))
        raise
    try:
        yield RayCluster(cluster.address, port, nodes["head"], nodes["second"], cluster)
    finally:
        _shutdown(cluster)


def _add_second_node(cluster: Any) -> Any:
    return cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1", resources={"second": 1})


def _live_nodes(ray: Any) -> dict[str, str]:
    """{"head": node id, "second": node id} of the live nodes."""
    return {
        "head" if "head" in n["Resources"] else "second": n["NodeID"]
        for n in ray.nodes()
        if n["Alive"]
    }


def _shutdown(cluster: Any) -> None:
    import ray
    from ray import serve

    try:
        if ray.is_initialized():
            serve.shutdown()
    finally:
        ray.shutdown()
        cluster.shutdown()


def descendants(pid: int) -> list[int]:
    """The processes under `pid` (from /proc), deepest first."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found: list[int] = []
    todo = list(children.get(pid, []))
    while todo:
        child = todo.pop()
        found.append(child)
        todo.extend(children.get(child, []))
    return found[::-1]


def kill_node(raylet_pid: int) -> None:
    """SIGKILL a node's raylet, then what it started (this session's cluster's processes
    only): its actors' workers and their Kiln workers go as with a lost machine."""
    workers = descendants(raylet_pid)
    os.kill(raylet_pid, signal.SIGKILL)
    for pid in workers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
