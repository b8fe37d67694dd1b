"""Routed before loaded: a restart's deployments, and a first revision while it loads.

An API is routed (state `loading`) before its workers start, so a request to it
waits for the load (`serving.startup_timeout_s`, as at a cold start) and is
never answered 404, and readiness (`/ping`, `/v2/health/ready`) says "not yet"
instead of "nothing to serve". Two paths do this:

- `restore` routes every deployment's current revision before the server's
  ports answer (it only reads the store and the configs); `bring_up` then
  builds each one's environment and starts its APIs.
- a deploy routes the APIs of its revision whose name nothing serves yet
  (their first revision) at once; the rollout (rollout.py) starts that same
  entry and, having nothing to swap, leaves it routed. If the rollout fails,
  the entry leaves the routing again. An API that already serves a version
  keeps the rolling update: a loading version beside it could become the
  default before it can answer.

Mixed into `DeploymentManager` (deployments.py), whose state it uses.
"""

from __future__ import annotations

import asyncio
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.control.envstep import restore_environment, site_dirs_for
from kiln.control.packaging import read_dotenv
from kiln.control.rollout import Rollout, RolloutMixin, api_key
from kiln.errors import InvalidInput
from kiln.serving.router import ServedApi


@dataclass
class Restored:
    """One deployment routed again after a restart; `bring_up` loads it."""

    deployment: str
    folder: Path
    apis: list[tuple[ServedApi, int]] = field(default_factory=list)  # (API, replicas)


class LoadingMixin(RolloutMixin):
    """Restore and first-revision routing for `DeploymentManager` (over its rollouts)."""

    server: Any
    store: Any
    artifacts: Path
    owner: dict[str, str]
    fingerprints: dict[tuple[str, str | None], str]
    _lock: asyncio.Lock
    # First revisions of API names routed while they load: (name, version) -> API.
    _first: dict[tuple[str, str | None], ServedApi]
    _claimed: set[int]  # ids of those a rollout has taken to start

    if TYPE_CHECKING:  # DeploymentManager's

        def _load(self, folder: Path, deployment: str | None = None) -> Any: ...

        def _record_error(self, api: str, message: str) -> None: ...

    # ---- restore ------------------------------------------------------------------
    async def restore(self) -> list[Restored]:
        """Route every deployment's current revision (after a start or a crash).

        Only reads the store and the configs, so the server can route every API
        (state `loading`) before its ports answer; `bring_up` then builds each
        deployment's environment and starts its APIs at the replica count the
        autoscaler last asked for (0 for an API that was scaled to zero).
        """
        # Uploads and unpacks a stopped or killed server left half done (one server per home).
        await asyncio.to_thread(shutil.rmtree, self.artifacts / ".incoming", True)
        restored: list[Restored] = []
        async with self._lock:
            for dep in await asyncio.to_thread(self.store.list_deployments):
                item = await self._restore_one(dep)
                if item is not None:
                    restored.append(item)
        return restored

    async def _restore_one(self, dep: Any) -> Restored | None:
        if not dep.current_revision:
            return None
        revision = await asyncio.to_thread(self.store.get_revision, dep.name, dep.current_revision)
        folder = Path(revision.artifact_path) if revision else None
        if folder is None or not folder.is_dir():
            self._record_error(dep.name, f"revision {dep.current_revision} is missing")
            return None
        try:
            project = await asyncio.to_thread(self._load, folder, dep.name)
        except InvalidInput as exc:  # ConfigRejected: e.g. a `${VAR}` no longer passed
            self._record_error(dep.name, f"deployment '{dep.name}' was not restored: {exc}")
            return None
        records = await asyncio.to_thread(self.store.list_apis, dep.name)
        requested = {(r.name, r.version or None): r.requested_replicas for r in records}
        env = read_dotenv(folder)
        prints = self._fingerprints(project)
        item = Restored(dep.name, folder)
        for api in project.apis:
            if (api.name, api.version) not in requested:
                continue  # deleted with `kiln delete`
            if api.name in self.server.registry.groups and self.owner.get(api.name) != dep.name:
                self._record_error(
                    api.name,
                    f"deployment '{dep.name}' was not restored: API '{api.name}' is "
                    f"already served from the folder `kiln serve` started with",
                )
                continue
            served = self._served(api, project, dep.current_revision, env)
            count = min(requested[(api.name, api.version)], served.max_replicas)
            self.server.registry.add(served)
            self.owner[api.name] = dep.name
            self.fingerprints[api_key(api)] = prints[api_key(api)]
            item.apis.append((served, count))
        jobs = self.server.jobs
        for batch in project.batch_apis if jobs is not None else []:
            if (batch.name, None) in requested and batch.name not in jobs.apis:
                jobs.register(batch, project.root, dep.current_revision)
                self.owner[batch.name] = dep.name
        return item

    async def bring_up(self, item: Restored) -> None:
        """Load a restored deployment: its environment (rebuilt if pruned), then its APIs.

        If its requirements.txt cannot be installed here any more, its APIs leave
        the routing again (the error is recorded for `kiln get`).
        """
        if not await restore_environment(self, item.deployment, item.folder):
            for served, _ in item.apis:
                self._unroute(served, item.deployment)
            await asyncio.gather(*(s.stop(1) for s, _ in item.apis), return_exceptions=True)
            return
        site_dirs = site_dirs_for(item.folder)
        for served, _ in item.apis:
            served.worker_spec.site_dirs = site_dirs
        await asyncio.gather(*(served.start(count) for served, count in item.apis))

    def _unroute(self, served: ServedApi, deployment: str) -> None:
        """Take `served` out of the routing, if it is still the entry for its name and version."""
        group = self.server.registry.groups.get(served.name)
        if group is None or group.versions.get(served.version) is not served:
            return
        self.server.registry.remove(served.name, served.version)
        if served.name not in self.server.registry.groups and self.owner.get(served.name) == (
            deployment
        ):
            self.owner.pop(served.name, None)
            self.fingerprints.pop(api_key(served.api), None)

    # ---- a first revision: routed while it loads ----------------------------------
    def _route_first_revision(self, deployment: str, digest: str, project: Any) -> list[ServedApi]:
        """Route the APIs whose name nothing serves yet, in state `loading`, from the deploy on.

        A request to one then waits for its load (`serving.startup_timeout_s`, as at a
        cold start) instead of getting 404 until the swap. An API that already has a
        version is left to the rolling update: adding a loading version beside it could
        make it the default before it can answer.
        """
        registry = self.server.registry
        served_names = {s.name for s in registry.all_unfiltered()}
        routed = []
        for api in project.apis:
            if api.name in served_names:
                continue
            served = self._served(api, project, digest, {})
            registry.add(served)
            self.owner[api.name] = deployment
            self._first[api_key(api)] = served
            routed.append(served)
        return routed

    async def _roll_out_first(self, rollout: Rollout, project: Any, first: list[ServedApi]) -> None:
        """The rollout; if it fails, the first-revision APIs it routed leave the routing."""
        try:
            await self._roll_out(rollout, project)
        finally:
            for served in first:
                self._claimed.discard(id(served))
                if self._first.get(api_key(served.api)) is served:
                    del self._first[api_key(served.api)]
            if rollout.status == "error":
                for served in first:
                    self._unroute(served, rollout.deployment)
                await asyncio.gather(
                    *(s.stop(1) for s in first if s.state != "stopped"), return_exceptions=True
                )

    def _served(self, api: Any, project: Any, revision: str | None, env: dict[str, str]) -> Any:
        """The rollout's new API: the one routed at the deploy when this is its first revision."""
        routed = self._first.get(api_key(api))
        if routed is not None and routed.revision == revision and id(routed) not in self._claimed:
            self._claimed.add(id(routed))  # once: a second deploy of the same revision rolls
            routed.worker_spec.site_dirs = site_dirs_for(project.root)  # built by now
            return routed
        return super()._served(api, project, revision, env)

    def _acceptable(self, served: ServedApi) -> bool:
        """A first revision replaces nothing: ready, or waiting for GPUs, is live."""
        if self._first.get(api_key(served.api)) is served:
            return served.state in ("ready", "compute unavailable")
        return super()._acceptable(served)
