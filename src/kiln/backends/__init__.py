"""Where replicas and batch workers run: the one interface the control plane places through.

Why an interface: the control plane (deploys, rollouts, the autoscaler, the batch
job manager) must not know whether an API version's workers are local processes
under this server or Ray Serve replicas across a cluster; the CLI and the management
REST API never branch on it. Each backend starts user code the same way, a Kiln
worker subprocess from a `LaunchSpec` (serving/process.py), so handlers, runtimes,
batching, the sandbox and the clean environment behave identically everywhere.

Implementations: local processes (serving/'s ReplicaPool, to be moved behind this
interface) and `kiln.backends.ray` (Ray Serve; imported only by the CLI, which
injects it, so nothing below the CLI imports Ray). See docs/architecture.md, "Backends".
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from kiln.config import ApiSpec, BatchApiSpec, Project


@dataclass
class ReplicaStatus:
    """One replica of an API version as a backend sees it (`kiln get` shows these)."""

    api: str
    version: str | None
    replica: str  # the backend's id: "<revision>-<index>" locally, Serve's replica id on Ray
    state: str  # "loading", "ready", "restarting", "failed", "stopping"
    node: str = ""  # where it runs: "" on one machine, the Ray node id on a cluster
    pid: int | None = None  # the Kiln worker subprocess, when known
    error: str | None = None


@dataclass
class ApiStatus:
    """An API version's replicas and what the backend is scaling it to."""

    api: str
    version: str | None
    target: int
    replicas: list[ReplicaStatus] = field(default_factory=list)


class Backend(Protocol):
    """What the control plane asks of the place where workers run.

    Every method is idempotent on the revision it names, so a control plane that
    restarts can re-apply its state from the store (PostgreSQL when shared) without
    knowing what the backend kept running meanwhile.
    """

    name: str
    """"local" or "ray": shown by `kiln server status`, never branched on."""

    async def deploy(self, revision: str, project: Project, tenant: str = "") -> None:
        """Run every realtime API version of `project` as revision `revision`.

        Replaces the tenant's previous revision of the same APIs with no failed
        request (a rolling update: old replicas drain after the new ones are ready);
        returns once the new revision answers or raises with why it cannot."""
        ...

    async def scale(
        self, api: ApiSpec, *, min_replicas: int, max_replicas: int, tenant: str = ""
    ) -> None:
        """Change an API version's replica bounds (management API `min_worker`/`max_worker`);
        within them the backend's autoscaler decides (Kiln's locally, Serve's on Ray)."""
        ...

    async def delete(self, api: str, version: str | None = None, tenant: str = "") -> None:
        """Stop an API (every version when `version` is None) after its requests drain."""
        ...

    async def status(self, tenant: str | None = None) -> list[ApiStatus]:
        """Every API version's replicas, with their node: what `kiln get` shows."""
        ...

    def logs(
        self, api: str, version: str | None = None, *, since: float | None = None
    ) -> AsyncIterator[dict[str, Any]]:
        """The API's replica log records (JSON lines, `ts` ordered), merged over every
        replica wherever it runs: what `kiln logs API` prints."""
        ...

    async def start_job_workers(
        self, job_id: str, api: BatchApiSpec, workers: int, project: Project
    ) -> None:
        """Start `workers` batch workers for a job; they claim batches from the durable
        queue in the state store (leases, retries), so where they run does not matter."""
        ...
