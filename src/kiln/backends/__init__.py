"""Where replicas and batch workers run: the one interface the control plane places through.

Why an interface: the control plane (deploys, rollouts, rollback, refresh, delete,
restore, the batch job manager) must not know whether an API version's replicas
are local worker processes or Ray Serve replicas across a cluster; the CLI and the
management REST API never branch on it. The control plane's rollout logic stays
one (control/deployments.py: blue/green per API version, swap, drain); a backend
gives it the `ServedApi` to start, swap, drain and stop, and says where a job's
workers run. Each backend starts user code the same way, a Kiln worker subprocess
from a `LaunchSpec` (serving/process.py), so handlers, runtimes, batching, the
sandbox and the clean environment behave identically everywhere.

Implementations: `kiln.backends.local.LocalBackend` (the default: replicas are
worker processes under this server, scaled by Kiln's autoscaler; job workers are
`JobRun`'s local slots) and `kiln.backends.ray.cluster.RayBackend` (`kiln server
--backend ray`: each API revision a Ray Serve application, job workers Ray actors;
imported only by the CLI, which injects it, so nothing below the CLI imports Ray).
See docs/architecture.md, "Backends".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol


class Backend(Protocol):
    """What the control plane asks of the place where replicas and job workers run."""

    name: str
    """"local" or "ray": shown in logs and job logs, never branched on."""
    local_outputs: bool
    """Whether a job's local output folder is reachable by its workers (False: they run
    on other machines, so a job must write to shared storage)."""

    async def start(self, server: Any) -> None:
        """Before anything is restored: connect (Ray), adopt what already runs."""
        ...

    async def loaded(self) -> None:
        """The restore finished: what the backend runs that nothing restored may go."""
        ...

    async def close(self) -> None:
        """The control plane stops. What the backend runs elsewhere may keep serving
        (Ray); local workers stop with the server's APIs."""
        ...

    def served_api(self, api: Any, *, root: Path, **kwargs: Any) -> Any:
        """The `ServedApi` for one API version of one revision (kwargs: `cwd`, `log_line`,
        `observer`, `sandbox`, `tenant`). Its `start` places the replicas (and raises with
        why they cannot run), its `stop` drains them and frees what it placed; the
        control plane swaps it in and out of routing (a rolling update with no failed
        request, also for rollback and refresh), and `kiln get` reads its state (and
        `placement`, its replicas per node, when the backend knows them)."""
        ...

    async def start_job_workers(self, job: Any, spec: Any, root: Path, env: dict[str, str]) -> Any:
        """A Batch API job's workers, claiming from its durable queue in the store; the
        handle `JobRun` follows (`nodes`, `done`, `new_lines`, `cancel`), or None: run
        them here as `JobRun`'s own slots."""
        ...
