"""`kiln server --backend ray --ray-address ADDR --store postgresql://...`: the flags and
the backend object they make (docs/architecture.md, "Backends").

The CLI is the one place that imports `kiln.backends.ray` (and so Ray): it builds
the backend and hands it to the server in `ServerOptions.backend`; nothing below
branches on which backend it is.
"""

from __future__ import annotations

import importlib.util
from typing import Annotated, Any

import typer

SAVED = " Saved in <home>/server.yaml for later starts."
BACKENDS = ("local", "ray")
RAY_HTTP_PORT = 8000  # Ray Serve's own default

BackendOption = Annotated[
    str | None,
    typer.Option(
        "--backend",
        help="Where API versions run: `local` (worker processes on this machine, the "
        "default) or `ray` (Ray Serve across a Ray cluster; needs --ray-address and a "
        "PostgreSQL --store)." + SAVED,
    ),
]
RayAddressOption = Annotated[
    str | None,
    typer.Option(
        "--ray-address",
        help="The Ray cluster for --backend ray: `auto` or HOST:PORT of its GCS "
        "(`ray start --head` prints it)." + SAVED,
    ),
]
RayHttpPortOption = Annotated[
    int | None,
    typer.Option(
        "--ray-http-port",
        help="Port of Ray Serve's HTTP proxy on every node, on --host (default 8000)." + SAVED,
    ),
]
StoreOption = Annotated[
    str | None,
    typer.Option(
        "--store",
        help="The state store's URL (default: a SQLite file in the home, or $KILN_STATE_URL): "
        "postgresql+psycopg://USER:PASSWORD@HOST/DB, shared with the Ray cluster's "
        "ingress for keys and quotas." + SAVED,
    ),
]


class BackendFlagError(ValueError):
    """A backend flag that cannot work; the message names it and the fix."""


def normalized_store(url: str | None) -> str | None:
    """`postgresql://` as SQLAlchemy's psycopg 3 driver URL; others as given."""
    if url and url.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def check_backend(settings: dict[str, Any]) -> None:
    """Refuse a backend that cannot start, before anything is saved or started."""
    backend = settings.get("backend") or "local"
    if backend not in BACKENDS:
        raise BackendFlagError(f"--backend {backend!r}: use `local` or `ray`")
    if backend != "ray":
        return
    if not settings.get("ray_address"):
        raise BackendFlagError(
            "--backend ray needs --ray-address: `auto` on a node of the cluster, or the "
            "head's HOST:PORT (`ray start --head` prints it)"
        )
    store = normalized_store(settings.get("store"))
    if not store or not store.startswith("postgresql+psycopg://"):
        raise BackendFlagError(
            "--backend ray needs a store the cluster shares: --store "
            "postgresql+psycopg://USER:PASSWORD@HOST/DB (SQLite stays on this machine)"
        )
    if importlib.util.find_spec("ray") is None or importlib.util.find_spec("ray.serve") is None:
        raise BackendFlagError("--backend ray needs Ray Serve: pip install 'kiln-serve[ray]'")


def make_backend(settings: dict[str, Any]) -> Any:
    """The backend object for `ServerOptions.backend` (None: local worker processes)."""
    if (settings.get("backend") or "local") != "ray":
        return None
    from kiln.backends.ray.cluster import RayBackend

    return RayBackend(
        settings["ray_address"],
        store_url=normalized_store(settings.get("store")),
        http_host=settings["host"],
        http_port=int(settings.get("ray_http_port") or RAY_HTTP_PORT),
    )
