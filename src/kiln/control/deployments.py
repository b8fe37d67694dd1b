"""Deployments: revisions in, rolling updates out, and everything back after a restart.

A deploy is an uploaded project archive. The manager extracts it into the
artifact store (`<KILN_HOME>/artifacts/<deployment>/<hash>/`), validates its
kiln.yaml, records a revision named by the content hash, and rolls it out in
the background:

- an API whose config and files did not change keeps its replicas;
- a changed or new API gets a fresh `ServedApi` whose replicas load while the
  old ones keep serving; once every changed API of the revision is ready the
  registry swaps them in one event-loop step (no request sees a gap), and the
  old ones drain: queued and running requests finish, late arrivals are handed
  to the successor;
- if any new API fails to load, nothing is swapped: the new replicas stop, the
  revision is marked `error` with the worker's message, and the old revision
  keeps serving.

A first revision (an API name nothing serves yet) is routed from the deploy on,
so requests wait for its load instead of 404 (loading.py). After a restart
`restore()` routes each deployment's current revision from the artifact store
and `bring_up()` loads it with the replica counts the autoscaler last asked for.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from collections import deque
from pathlib import Path
from typing import Any

from kiln.config import ConfigError, load_project
from kiln.control.loading import LoadingMixin
from kiln.control.ownership import OwnershipMixin, _in_namespace, user_of
from kiln.control.packaging import short_revision, unpack_project
from kiln.control.rollout import DRAIN_GRACE_S, Rollout
from kiln.control.store import ApiSpec as StoredApi
from kiln.control.store import NotFoundError, Store
from kiln.control.tenancy import config_scope
from kiln.errors import Conflict, InvalidInput, NotFound
from kiln.serving.router import ServedApi

log = logging.getLogger("kiln.deployments")
DEPLOYMENT_NAME_HELP = (
    "name the deployment: add `- kind: deployment` with `name: <name>` to kiln.yaml, or "
    "deploy with --name"
)


class ConfigRejected(InvalidInput):
    """The uploaded project's kiln.yaml has problems; `issues` lists each one."""

    type = "ConfigError"

    def __init__(self, error: ConfigError) -> None:
        super().__init__(f"the project's configuration has problems:\n{error}")
        self.issues = [str(issue) for issue in error.issues]


class DeploymentManager(LoadingMixin, OwnershipMixin):
    """Owns deploy, rollout, rollback, refresh, delete and restore for one server."""

    def __init__(self, server: Any, store: Store, home: Path) -> None:
        self.server = server
        self.store = store
        self.artifacts = home / "artifacts"
        self.rollouts: dict[str, Rollout] = {}
        self.owner: dict[str, str] = {}  # API name -> deployment
        self.fingerprints: dict[tuple[str, str | None], str] = {}
        self.errors: dict[str, deque[dict[str, Any]]] = {}
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[Any]] = set()
        # First revisions of API names routed while they load: (name, version) -> API.
        self._first: dict[tuple[str, str | None], ServedApi] = {}
        self._claimed: set[int] = set()  # ids of those a rollout has taken to start
        # APIs whose first deploy failed: nothing serves them, yet `kiln get` lists them
        # as `error` with the reason until a deploy brings them up or `kiln delete`.
        self.failed_first: dict[str, dict[str, Any]] = {}
        # Runtime traffic splits (kiln traffic, PUT /apis/{name}/traffic, set-default) are
        # kept in the store; the registry loads an API's when it routes the API.
        server.registry.traffic_store = store

    # ---- loading a revision -------------------------------------------------------
    def _load(self, folder: Path, deployment: str | None = None, tenant: str | None = None) -> Any:
        """The project in `folder`; a user's deployment (`<user>.<name>`) gets their namespace.

        A user's API `sentiment` is `<user>.sentiment` inside the server (the model name
        on protocol routes) and is served at `/<user>/sentiment`, as in seed 003. What its
        kiln.yaml may reach (`${VAR}`, paths) depends on whose it is (tenancy.py); `tenant`
        names the user before the deployment has its final name.
        """
        user = user_of(deployment)
        scope = config_scope(folder, user if deployment else tenant, self.server)
        try:
            project = load_project(folder, **scope.kwargs())
        except ConfigError as exc:
            raise ConfigRejected(exc) from None
        if user is not None:
            plan = self._plan(user)  # its bounds apply to what the user left to defaults
            project.apis = [_in_namespace(api, user, plan) for api in project.apis]
            project.batch_apis = [_in_namespace(api, user, plan) for api in project.batch_apis]
        return project

    async def deploy(
        self, archive: bytes | Path, name: str | None = None, principal: Any = None
    ) -> dict[str, Any]:
        """Accept an uploaded project (bytes, or the file it was streamed to); returns at once
        with the rollout started (or a no-op)."""
        staging = self.artifacts / ".incoming" / f"{os.getpid()}-{time.monotonic_ns()}"
        staging.parent.mkdir(parents=True, exist_ok=True)
        plan = self._plan(None if principal is None or principal.is_admin else principal.user)
        limit = plan.max_unpacked_bytes if plan is not None else None
        digest = await asyncio.to_thread(unpack_project, archive, staging, max_unpacked=limit)
        try:
            tenant = None if principal is None or principal.is_admin else principal.user
            project = await asyncio.to_thread(self._load, staging, None, tenant)
            deployment = name or project.deployment_name
            if not deployment:
                raise InvalidInput(f"the deployment has no name; {DEPLOYMENT_NAME_HELP}")
            from kiln.config.blocks import check_name

            try:
                check_name(deployment, "deployment")
            except ValueError as exc:
                raise InvalidInput(f"deployment name {deployment!r}: {exc}") from None
            if not project.apis and not project.batch_apis:
                raise InvalidInput(
                    "the project declares no API; add a `- kind: api` (or `- kind: BatchAPI`) "
                    "entry to kiln.yaml"
                )
            self._check_limits(principal, project)
            if principal is not None and not principal.is_admin:
                deployment = f"{principal.user}.{deployment}"
            else:
                self._check_user_paths(project)
            final = self.artifacts / deployment / digest
            if final.exists():
                shutil.rmtree(staging, ignore_errors=True)
            else:
                final.parent.mkdir(parents=True, exist_ok=True)
                staging.rename(final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        async with self._lock:
            try:
                current = await asyncio.to_thread(self.store.get_deployment, deployment)
                project = await asyncio.to_thread(self._load, final, deployment)
                self._check_owners(deployment, project)
                if principal is not None and not principal.is_admin:
                    self._check_plan(principal.user, project)
            except Exception:
                await asyncio.to_thread(self._drop_refused, deployment, digest, final)
                raise
            unchanged = (
                current is not None
                and current.current_revision == digest
                and all(self._is_served(deployment, api, digest) for api in project.apis)
                and all(self.owner.get(b.name) == deployment for b in project.batch_apis)
                and not self._rolling(deployment)
            )
            if unchanged:
                return {
                    "deployment": deployment,
                    "revision": short_revision(digest),
                    "status": "unchanged",
                    "message": "the project has not changed since its last deploy; nothing to do",
                    "apis": self._api_urls(project),
                }
            await asyncio.to_thread(self._record_revision, deployment, digest, final, project)
            names = {a.name for a in project.apis} | {b.name for b in project.batch_apis}
            rollout = Rollout(deployment, digest, apis=sorted(names))
            self.rollouts[deployment] = rollout
            first = self._route_first_revision(deployment, digest, project)
        self._spawn(self._first_deploy(rollout, project, first))
        return {**rollout.to_json(), "apis": self._api_urls(project)}

    async def _first_deploy(self, rollout: Rollout, project: Any, first: list[ServedApi]) -> None:
        """The rollout, then what `kiln get` keeps of it: a failed first revision's APIs are
        unrouted (loading.py), so they are remembered here with the reason."""
        try:
            await self._roll_out_first(rollout, project, first)
        finally:
            names = [a.name for a in project.apis] + [b.name for b in project.batch_apis]
            if rollout.status == "live":
                for name in names:
                    self.failed_first.pop(name, None)
            elif rollout.status == "error":
                served_now = self.server.registry.groups
                specs = [s.api for s in first] + [
                    b for b in project.batch_apis if b.name not in self.owner
                ]
                for api in specs:
                    if api.name not in served_now:
                        self.failed_first[api.name] = {
                            "deployment": rollout.deployment,
                            "revision": rollout.revision,
                            "error": rollout.error or "the deploy failed",
                            "time": rollout.finished or time.time(),
                            "api": api,
                        }

    def _record_revision(self, deployment: str, digest: str, folder: Path, project: Any) -> None:
        specs = [
            StoredApi(
                name=a.name,
                version=a.version or "",
                min_replicas=a.compute.min_replicas,
                max_replicas=a.compute.max_replicas,
                init_replicas=a.compute.init_replicas or a.compute.min_replicas or 1,
            )
            for a in project.apis
        ] + [
            StoredApi(name=b.name, min_replicas=0, max_replicas=0, init_replicas=0)
            for b in project.batch_apis
        ]
        config_text = project.config_file.read_text(encoding="utf-8")
        revision, created = self.store.add_revision(
            deployment,
            digest,
            config_text=config_text,
            artifact_path=str(folder),
            apis=specs,
            status="updating",
        )
        if not created:
            self.store.ensure_revision_apis(deployment, digest, specs)
            self.store.set_revision_status(deployment, digest, "updating")

    def _check_owners(self, deployment: str, project: Any) -> None:
        for api in [*project.apis, *project.batch_apis]:
            owner = self.owner.get(api.name)
            if owner is None and api.name in self.server.registry.groups:
                owner = "the project `kiln serve` started with"
            if owner is not None and owner != deployment:
                raise Conflict(
                    f"an API named '{api.name}' already belongs to {owner!r}; rename the API "
                    f"in kiln.yaml, or delete the other one first (kiln delete {api.name})"
                )

    def _is_served(self, deployment: str, api: Any, digest: str) -> bool:
        group = self.server.registry.groups.get(api.name)
        served = group.versions.get(api.version) if group else None
        return served is not None and self.owner.get(api.name) == deployment

    def _rolling(self, deployment: str) -> bool:
        rollout = self.rollouts.get(deployment)
        return rollout is not None and rollout.status == "updating"

    def _api_urls(self, project: Any) -> list[dict[str, Any]]:
        return [
            {"name": a.name, "version": a.version, "endpoint": a.endpoint} for a in project.apis
        ]

    # ---- lifecycle operations -----------------------------------------------------
    def deployment_of(self, api: str) -> str:
        owner = self.owner.get(api)
        if owner is None:
            if api in self.server.registry.groups:
                raise Conflict(
                    f"API '{api}' was started by `kiln serve` from its folder, not deployed; "
                    f"stop that server to remove it"
                )
            raise NotFound(f"no API named '{api}'; `kiln get` lists the deployed APIs")
        return owner

    async def delete_api(self, name: str) -> dict[str, Any]:
        failed = self.failed_first.get(name) if name not in self.owner else None
        if failed is not None:  # a first deploy that failed: nothing runs, only records
            return await self._forget_failed_first(name, failed["deployment"])
        deployment = self.deployment_of(name)
        async with self._lock:
            jobs = self.server.jobs
            if jobs is not None and name in jobs.apis:
                await jobs.unregister(name)  # its running jobs end `stopped`
            group = self.server.registry.groups.get(name)
            removed = []
            if group is not None:
                for version in list(group.versions):
                    served = self.server.registry.remove(name, version)
                    self.server.stop_autoscaler(served)
                    removed.append(served)
                    self.fingerprints.pop((name, version), None)
            self.owner.pop(name, None)
            await asyncio.to_thread(self.store.set_traffic, name, None)  # its runtime split
            remaining = [a for a, d in self.owner.items() if d == deployment]
            if remaining:
                await asyncio.to_thread(self.store.delete_api, deployment, name)
            else:
                await asyncio.to_thread(self.store.delete_deployment, deployment)
                self.rollouts.pop(deployment, None)
            self.server.log.write(name, {"event": "deploy", "message": f"API '{name}' deleted"})
        await asyncio.gather(*(s.stop(DRAIN_GRACE_S) for s in removed), return_exceptions=True)
        return {"deleted": name, "deployment": deployment, "deployment_deleted": not remaining}

    async def _forget_failed_first(self, name: str, deployment: str) -> dict[str, Any]:
        async with self._lock:
            self.failed_first.pop(name, None)
            self.errors.pop(name, None)
            others = [a for a, d in self.owner.items() if d == deployment]
            others += [a for a, f in self.failed_first.items() if f["deployment"] == deployment]
            if not others:
                await asyncio.to_thread(self.store.delete_deployment, deployment)
                self.rollouts.pop(deployment, None)
            self.server.log.write(name, {"event": "deploy", "message": f"API '{name}' deleted"})
        return {"deleted": name, "deployment": deployment, "deployment_deleted": not others}

    async def refresh(self, name: str) -> dict[str, Any]:
        """Restart an API's replicas without downtime: a rollout of the same revision."""
        deployment = self.deployment_of(name)
        served = self.server.registry.by_name(name).default
        revision = await asyncio.to_thread(self.store.get_revision, deployment, served.revision)
        if revision is None:
            raise NotFound(f"API '{name}' has no recorded revision to refresh")
        project = await asyncio.to_thread(self._load, Path(revision.artifact_path), deployment)
        project.apis = [a for a in project.apis if a.name == name]
        project.batch_apis = []  # a refresh restarts realtime replicas; jobs keep running
        rollout = Rollout(deployment, revision.content_hash, apis=[name])
        self.rollouts[deployment] = rollout
        self._spawn(self._roll_out(rollout, project, force=True))
        return rollout.to_json()

    async def rollback(self, name: str, revision: str | None) -> dict[str, Any]:
        """Roll the API's deployment back to `revision` (default: the one before the current)."""
        deployment = self.deployment_of(name)
        revisions = await asyncio.to_thread(self.store.list_revisions, deployment)
        current = (await asyncio.to_thread(self.store.get_deployment, deployment)).current_revision
        if revision is None:
            older = [r for r in revisions if r.content_hash != current and r.status == "live"]
            if not older:
                raise NotFound(
                    f"deployment '{deployment}' has no earlier live revision to roll back to; "
                    f"`kiln get {name}` lists its revisions"
                )
            target = older[0]
        else:
            matches = [r for r in revisions if r.content_hash.startswith(revision)]
            if len(matches) != 1:
                known = ", ".join(short_revision(r.content_hash) for r in revisions)
                raise NotFound(
                    f"deployment '{deployment}' has no revision '{revision}' (revisions: {known})"
                )
            target = matches[0]
        if target.content_hash == current:
            raise Conflict(f"revision {short_revision(current)} is already the current one")
        project = await asyncio.to_thread(self._load, Path(target.artifact_path), deployment)
        rollout = Rollout(
            deployment,
            target.content_hash,
            apis=sorted({a.name for a in project.apis} | {b.name for b in project.batch_apis}),
        )
        self.rollouts[deployment] = rollout
        await asyncio.to_thread(
            self.store.set_revision_status, deployment, target.content_hash, "updating"
        )
        self._spawn(self._roll_out(rollout, project))
        return rollout.to_json()

    def persist_scale(self, served: ServedApi, to_replicas: int, reason: str) -> None:
        """Record the autoscaler's decision so a restart comes back at the same size."""
        deployment = self.owner.get(served.name)
        if deployment is None:
            return
        try:
            self.store.scale_api(
                deployment, served.name, to_replicas, reason=reason, version=served.version or ""
            )
        except NotFoundError:
            pass

    # ---- reporting ----------------------------------------------------------------
    def status_of(self, deployment: str) -> dict[str, Any]:
        dep = self.store.get_deployment(deployment)
        if dep is None:
            raise NotFound(f"no deployment named '{deployment}'")
        revisions = self.store.list_revisions(deployment)
        rollout = self.rollouts.get(deployment)
        return {
            "name": deployment,
            "current_revision": short_revision(dep.current_revision or ""),
            "updated_at": dep.updated_at,
            "rollout": rollout.to_json() if rollout else None,
            "apis": sorted(a for a, d in list(self.owner.items()) if d == deployment),
            "revisions": [
                {
                    "revision": short_revision(r.content_hash),
                    "created_at": r.created_at,
                    "status": r.status,
                    "error": r.error,
                    "current": r.content_hash == dep.current_revision,
                }
                for r in revisions
            ],
        }

    def _record_error(self, api: str, message: str) -> None:
        self.errors.setdefault(api, deque(maxlen=10)).append(
            {"time": time.time(), "error": message}
        )

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_report_crash)


def _report_crash(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("a rollout failed unexpectedly", exc_info=task.exception())
