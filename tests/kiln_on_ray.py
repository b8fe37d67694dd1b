"""Test support: `kiln server --backend ray` on the session's 2-node cluster, and cleanup.

A test module starts the control plane with `start(...)` (a real `kiln server start`
with the Ray flags, PostgreSQL wiped first) and calls `remove_kiln_apps()` after
stopping it: the data plane outlives its control plane by design, so what the
module deployed must be removed from Serve explicitly.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from daemon import Daemon
from ray_cluster import RayCluster

PG_URL = os.environ.get("KILN_TEST_POSTGRES_URL")


def needs_postgres() -> str:
    if not PG_URL:
        if os.environ.get("CI") == "true":
            pytest.fail("KILN_TEST_POSTGRES_URL is not set under CI=true")
        pytest.skip("KILN_TEST_POSTGRES_URL not set (an empty PostgreSQL this test may wipe)")
    return PG_URL


def wipe(url: str) -> None:
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("DROP SCHEMA public CASCADE"))
        conn.execute(sa.text("CREATE SCHEMA public"))
    engine.dispose()


def ray_flags(cluster: RayCluster, url: str) -> tuple[str, ...]:
    return (
        "--backend",
        "ray",
        "--ray-address",
        cluster.address,
        "--ray-http-port",
        str(cluster.http_port),
        "--store",
        url.replace("postgresql+psycopg://", "postgresql://"),
    )


def start(cluster: RayCluster, home: Path, env: dict[str, str] | None = None) -> Daemon:
    """A `kiln server --backend ray` on a wiped store; `.proxy` is Serve's proxy URL."""
    url = needs_postgres()
    wipe(url)
    daemon = Daemon(home)
    daemon.env.update(env or {})
    daemon.ray_flags = ray_flags(cluster, url)  # type: ignore[attr-defined]
    daemon.start(*daemon.ray_flags)  # type: ignore[attr-defined]
    daemon.proxy = cluster.url  # type: ignore[attr-defined]
    return daemon


def remove_kiln_apps(timeout: float = 60) -> None:
    """Delete every application a control plane deployed (an empty declarative config)."""
    from ray import serve
    from ray.serve.schema import ServeDeploySchema

    serve.context._get_global_client().deploy_apps(ServeDeploySchema(applications=[]))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if "kiln-ingress" not in serve.status().applications:
            return
        time.sleep(0.5)
