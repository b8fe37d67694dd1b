"""`LocalBackend`: replicas as worker processes under this server (the default).

The control plane's code for one machine, behind the `Backend` interface:
`ServedApi` (serving/served.py over `ReplicaPool`) starts, supervises and
restarts each API version's worker processes, Kiln's autoscaler scales them,
and a Batch API job's workers run as `JobRun`'s own slots (`start_job_workers`
answers None: here).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kiln.serving.served import ServedApi


class LocalBackend:
    """This machine's worker processes."""

    name = "local"
    local_outputs = True  # job workers write on this machine

    async def start(self, server: Any) -> None:
        return None

    async def loaded(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def served_api(self, api: Any, *, root: Path, **kwargs: Any) -> ServedApi:
        return ServedApi(api, **kwargs)

    async def start_job_workers(self, job: Any, spec: Any, root: Path, env: dict[str, str]) -> None:
        return None  # JobRun's slots: worker processes of this server
