"""`ClusterServedApi`: an API version the control plane placed on Ray (cluster.py).

To the control plane it is a `ServedApi` like any other (deployments.py starts,
swaps, drains and stops it; `kiln get` shows it), and the control plane's own
inference port serves it through its Serve handle as `KilnIngress` does. What
differs is underneath: `start` runs its revision as a Serve application and
`stop` lets the backend delete that application once the cluster's ingress no
longer routes to it. Serve, not Kiln's autoscaler, scales its replicas.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray import serve

from kiln.backends.ray.cluster_ingress import REPLICA_DEPLOYMENT
from kiln.backends.ray.ingress import RayServedApi


class ClusterServedApi(RayServedApi):
    """One API version of one revision as a Serve application of `backend`."""

    def __init__(self, api: Any, backend: Any, root: Path, **kwargs: Any) -> None:
        kwargs.setdefault("cwd", str(root))
        super().__init__(api, None, **kwargs)
        self.backend = backend
        self.root = str(root)
        self.app_name: str | None = None
        self.placement_error: str | None = None

    async def start(self, replicas: int | None = None) -> None:
        """Place the revision on the cluster (Serve starts its replicas), then open lanes."""
        try:
            name = await self.backend.place(self)
        except Exception as exc:
            self.placement_error = str(exc)
            raise
        self.handle = serve.get_deployment_handle(REPLICA_DEPLOYMENT, app_name=name)
        self.app_name = name
        await super().start(replicas)
        await self.backend.publish()  # a first revision: the ingress routes it now

    async def stop(self, grace: float) -> None:
        """Drain this entry's lanes; the backend deletes the application after the
        ingress let go of it (and never while the control plane itself stops)."""
        await super().stop(grace)
        if self.app_name is not None:
            await self.backend.release(self, self.app_name)

    @property
    def state(self) -> str:
        return "failed" if self.placement_error else super().state

    @property
    def error(self) -> str | None:
        return self.placement_error or super().error

    @property
    def placement(self) -> list[dict[str, Any]]:
        """Its Serve replicas with their node (`kiln get`)."""
        return self.backend.replicas(self.app_name) if self.app_name else []
