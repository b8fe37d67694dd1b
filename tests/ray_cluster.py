"""A real 2-node Ray cluster on 127.0.0.1 for the Ray backend's tests, one per session.

`ray.cluster_utils.Cluster` starts a head and a second node as this user's own
processes (never `ray stop`, which would kill every Ray process on the machine),
Serve's HTTP proxy runs on every node, and everything is stopped in reverse at
the end. Every wait is bounded. Without Ray, or when the cluster cannot start,
the tests skip; with CI=true they fail instead, so CI cannot pass by skipping.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
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

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"


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
            },
        )
        cluster.add_node(num_cpus=2, node_ip_address="127.0.0.1", resources={"second": 1})
        cluster.wait_for_nodes(timeout=START_TIMEOUT_S)
        ray.init(address=cluster.address, log_to_driver=False)
        assert cluster.address.startswith("127.0.0.1:"), cluster.address
        _wait(lambda: len([n for n in ray.nodes() if n["Alive"]]) == 2, 30, "2 live nodes")
        serve.start(http_options={"host": "127.0.0.1", "port": port, "location": "EveryNode"})
        nodes = {
            "head" if "head" in n["Resources"] else "second": n["NodeID"]
            for n in ray.nodes()
            if n["Alive"]
        }
    except BaseException as exc:  # a timeout too: never leave the cluster running
        if cluster is not None:
            _shutdown(cluster)
        if not isinstance(exc, Exception):
            raise
        _unavailable(repr(exc))
        raise
    try:
        yield RayCluster(cluster.address, port, nodes["head"], nodes["second"])
    finally:
        _shutdown(cluster)


def _shutdown(cluster: Any) -> None:
    import ray
    from ray import serve

    try:
        if ray.is_initialized():
            serve.shutdown()
    finally:
        ray.shutdown()
        cluster.shutdown()
