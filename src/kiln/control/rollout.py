"""How a revision replaces another: the rolling update, and what makes an API "unchanged".

The algorithm (see `deployments.py` for the whole story): changed APIs get new
replicas that load beside the old ones; only when every one of them is ready
does the registry swap them in, in one event-loop step, and the old ones drain.
A failure anywhere swaps nothing. Mixed into `DeploymentManager`, whose state
(`server`, `store`, `owner`, `fingerprints`, `rollouts`, `_lock`) it uses.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from kiln.control.envstep import prepare_environment, site_dirs_for
from kiln.control.ownership import user_of
from kiln.control.packaging import content_hash, project_files, read_dotenv, short_revision
from kiln.serving.router import ServedApi

log = logging.getLogger("kiln.deployments")
DRAIN_GRACE_S = 30.0


@dataclass
class Rollout:
    """What a deployment's latest deploy is doing (shown by `GET /deployments/{name}`)."""

    deployment: str
    revision: str
    status: str = "updating"  # updating | live | error
    error: str | None = None
    started: float = field(default_factory=time.time)
    finished: float | None = None
    apis: list[str] = field(default_factory=list)
    message: str | None = None  # the step in progress, e.g. the Python environment's build

    def to_json(self) -> dict[str, Any]:
        return {
            "deployment": self.deployment,
            "revision": short_revision(self.revision),
            "status": self.status,
            "error": self.error,
            "started": self.started,
            "finished": self.finished,
            "apis": self.apis,
            "message": self.message,
        }


def api_key(api: Any) -> tuple[str, str | None]:
    return api.name, api.version


class RolloutMixin:
    """Rolling updates for `DeploymentManager`."""

    server: Any
    store: Any
    owner: dict[str, str]
    fingerprints: dict[tuple[str, str | None], str]
    _lock: asyncio.Lock

    if TYPE_CHECKING:  # DeploymentManager's

        def _record_error(self, api: str, message: str) -> None: ...

    def _fingerprints(self, project: Any) -> dict[tuple[str, str | None], str]:
        """Per API: a hash of its own config and of every file but the config file.

        An API whose fingerprint is unchanged keeps its replicas across a deploy.
        """
        root = project.root
        config_rel = project.config_file.relative_to(root).as_posix()
        files = [f for f in project_files(root) if f != config_rel]
        files_hash = content_hash(root, files)
        out = {}
        for api in project.apis:
            dumped = orjson.dumps(api.model_dump(mode="json"), option=orjson.OPT_SORT_KEYS)
            dumped = dumped.replace(str(root).encode(), b"")
            out[api_key(api)] = hashlib.sha256(dumped + files_hash.encode()).hexdigest()
        return out

    def _served(self, api: Any, project: Any, revision: str | None, env: dict[str, str]) -> Any:
        # A user's API is `<user>.<name>` (ownership.py): its workers run as that tenant.
        served = self.server.served_api(api, project.root, tenant=user_of(api.name) or "")
        served.revision = revision
        served.worker_spec.site_dirs = site_dirs_for(project.root)  # its requirements.txt
        # What the deployment declares (env: over .env, tenancy.py), never `env`: that is
        # the .env read with python-dotenv's interpolation of the server's environment.
        served.extra_env = api.worker_env
        return served

    # ---- deploy -------------------------------------------------------------------
    # ---- rollout ------------------------------------------------------------------
    async def _roll_out(self, rollout: Rollout, project: Any, *, force: bool = False) -> None:
        """Bring `project` live beside what serves now, then swap; see the module docstring."""
        if not await prepare_environment(self, rollout, project):  # requirements.txt first
            return
        async with self._lock:
            deployment, digest = rollout.deployment, rollout.revision
            env = read_dotenv(project.root)
            prints = self._fingerprints(project)
            registry = self.server.registry
            fresh: list[ServedApi] = []
            for api in project.apis:
                group = registry.groups.get(api.name)
                old = group.versions.get(api.version) if group else None
                if (
                    old is not None
                    and not force
                    and self.fingerprints.get(api_key(api)) == (prints[api_key(api)])
                ):
                    old.revision = digest  # same config and files: keep its replicas
                    continue
                served = self._served(api, project, digest, env)
                fresh.append(served)
            self._log(rollout, f"rolling out revision {short_revision(digest)}")
            results = await asyncio.gather(
                *(s.start(self._replicas_for(s)) for s in fresh), return_exceptions=True
            )
            failed = [
                (s, r if isinstance(r, BaseException) else (s.error or s.compute_unavailable))
                for s, r in zip(fresh, results, strict=True)
                if isinstance(r, BaseException) or not self._acceptable(s)
            ]
            if failed:
                served, reason = failed[0]
                message = (
                    f"API '{served.name}' of revision {short_revision(digest)} failed to load: "
                )
                message += str(reason or "no replica became ready")
                await asyncio.gather(*(s.stop(1) for s in fresh), return_exceptions=True)
                rollout.status, rollout.error, rollout.finished = "error", message, time.time()
                await asyncio.to_thread(
                    self.store.set_revision_status, deployment, digest, "error", message
                )
                self._record_error(served.name, message)
                self._log(rollout, message + "; the previous revision keeps serving")
                return
            old_ones = []
            for served in fresh:
                # A first revision is routed while it loads (loading.py): nothing to swap.
                old = None if served in registry.all_unfiltered() else registry.swap(served)
                self.owner[served.name] = deployment
                self.fingerprints[api_key(served.api)] = prints[api_key(served.api)]
                self.server.start_autoscaler(served)
                if old is not None:
                    self.server.stop_autoscaler(old)
                    old_ones.append(old)
            # APIs the new revision no longer declares leave with it.
            declared = {api_key(a) for a in project.apis}
            for name, owner in list(self.owner.items()):
                if owner != deployment or name not in registry.groups:
                    continue
                for version in list(registry.groups[name].versions):
                    if (name, version) not in declared:
                        old_ones.append(registry.remove(name, version))
                        self.server.stop_autoscaler(old_ones[-1])
                if name not in registry.groups:
                    self.owner.pop(name, None)
            await self._roll_batch_apis(deployment, project, digest)
            await asyncio.to_thread(self._mark_live, deployment, digest)
            rollout.status, rollout.finished = "live", time.time()
            self._log(rollout, f"revision {short_revision(digest)} is live")
        await asyncio.gather(*(old.stop(DRAIN_GRACE_S) for old in old_ones), return_exceptions=True)

    async def _roll_batch_apis(self, deployment: str, project: Any, digest: str) -> None:
        """Batch APIs switch at once: running jobs keep the revision they started with."""
        jobs = self.server.jobs
        if jobs is None:
            return
        declared = {b.name for b in project.batch_apis}
        for batch in project.batch_apis:
            jobs.register(batch, project.root, digest)
            self.owner[batch.name] = deployment
        for name, owner in list(self.owner.items()):
            if owner == deployment and name in jobs.apis and name not in declared:
                if name not in self.server.registry.groups:
                    await jobs.unregister(name)
                    self.owner.pop(name, None)

    def _acceptable(self, served: ServedApi) -> bool:
        """Ready; or a new API waiting for GPUs (Cortex accepts it as `compute unavailable`)."""
        if served.state == "ready":
            return True
        group = self.server.registry.groups.get(served.name)
        replaces = group is not None and served.version in group.versions
        return served.state == "compute unavailable" and not replaces

    def _replicas_for(self, served: ServedApi) -> int:
        """Start a new revision with as many replicas as the old one runs (at least one)."""
        group = self.server.registry.groups.get(served.name)
        old = group.versions.get(served.version) if group else None
        compute = served.api.compute
        wanted = compute.init_replicas or compute.min_replicas or 1
        if old is not None:
            wanted = max(wanted, len(old.ready_slots()))
        return max(1, min(wanted, served.max_replicas))

    def _mark_live(self, deployment: str, digest: str) -> None:
        self.store.set_revision_status(deployment, digest, "live")
        self.store.set_current_revision(deployment, digest)

    def _log(self, rollout: Rollout, message: str) -> None:
        log.info("%s: %s", rollout.deployment, message)
        for api in rollout.apis:
            self.server.log.write(api, {"event": "deploy", "message": message})
