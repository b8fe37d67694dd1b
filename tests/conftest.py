from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from ray_cluster import ray_cluster  # noqa: E402, F401 - ONE 2-node cluster per session
from support import KilnServer  # noqa: E402

# Every server a test starts (`kiln serve`, `kiln server`) takes a free gRPC port rather
# than 8083, so servers run side by side; only where the grpc extra is installed, since a
# port asked for without it is an error.
if importlib.util.find_spec("grpc_health") is not None:
    os.environ.setdefault("KILN_GRPC_PORT", "0")


@pytest.fixture
def serve_project(tmp_path_factory: pytest.TempPathFactory):
    """Start `kiln serve` on a project folder; every server is stopped at teardown."""
    servers: list[KilnServer] = []

    def start(project: Path, *args: str, **env: str) -> KilnServer:
        server = KilnServer(project, tmp_path_factory.mktemp("home"), list(args), env or None)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
