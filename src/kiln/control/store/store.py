"""`Store`: the one object through which Kiln's durable state is read and written.

Deployments have revisions (one per distinct content hash of the uploaded project);
a revision declares its APIs with their replica settings; a deployment points at its
current revision (set after a successful rollout, or by a rollback). Scaling events,
tracker buckets and usage counters are keyed by API name and version rather than by
revision, so they survive redeploys and rollbacks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from . import schema as t
from .accounts import AccountsMixin
from .async_queue import AsyncQueueMixin
from .batch_queue import QueueMixin
from .counters import CountersMixin
from .jobs import JobsMixin
from .models import (
    ApiRecord,
    ApiSpec,
    Deployment,
    NotFoundError,
    Revision,
    ScalingEvent,
)
from .quota_counters import QuotaCountersMixin
from .series import SeriesMixin
from .traffic import TrafficMixin

_D, _R, _A, _E = t.deployments.c, t.revisions.c, t.apis.c, t.scaling_events.c


def _deployment(row: Any) -> Deployment:
    return Deployment(row.name, row.current_revision, row.created_at, row.updated_at)


def _revision(row: Any) -> Revision:
    return Revision(
        id=row.id,
        deployment=row.deployment,
        content_hash=row.content_hash,
        created_at=row.created_at,
        status=row.status,
        error=row.error,
        artifact_path=row.artifact_path,
        config_text=row.config_text,
    )


def _api(row: Any) -> ApiRecord:
    return ApiRecord(
        deployment=row.deployment,
        revision=row.content_hash,
        name=row.name,
        version=row.version,
        min_replicas=row.min_replicas,
        max_replicas=row.max_replicas,
        init_replicas=row.init_replicas,
        requested_replicas=row.requested_replicas,
    )


def _event(row: Any) -> ScalingEvent:
    return ScalingEvent(
        row.id, row.at, row.api, row.version, row.from_replicas, row.to_replicas, row.reason
    )


_REVISIONS = sa.select(t.revisions, _D.name.label("deployment")).join(
    t.deployments, _R.deployment_id == _D.id
)
_APIS = sa.select(t.apis, _R.content_hash, _D.name.label("deployment")).select_from(
    t.apis.join(t.revisions, _A.revision_id == _R.id).join(t.deployments, _R.deployment_id == _D.id)
)


class Store(
    CountersMixin,
    JobsMixin,
    QueueMixin,
    AccountsMixin,
    SeriesMixin,
    AsyncQueueMixin,
    TrafficMixin,
    QuotaCountersMixin,
):
    """Kiln's state store. Open one per process: `Store()` or `Store("postgresql+psycopg://...")`.

    Methods are synchronous, thread-safe and each one transaction; see `base.py` for
    how an asyncio server calls them. Results are frozen dataclasses from `models.py`.
    """

    # ---- deployments -----------------------------------------------------------

    def ensure_deployment(self, name: str, *, at: float | None = None) -> Deployment:
        """The deployment `name`, created (with no current revision) if missing."""
        with self._write() as conn:
            return _deployment(self._ensure_deployment(conn, name, self._now(at)))

    def get_deployment(self, name: str) -> Deployment | None:
        with self._read() as conn:
            row = conn.execute(sa.select(t.deployments).where(_D.name == name)).first()
        return _deployment(row) if row else None

    def list_deployments(self) -> list[Deployment]:
        with self._read() as conn:
            rows = conn.execute(sa.select(t.deployments).order_by(_D.name)).all()
        return [_deployment(r) for r in rows]

    def delete_deployment(self, name: str) -> bool:
        """Delete a deployment with its revisions and APIs; False if there was none.

        Tracker, usage and scaling history stay: they are history, and usage is
        what a bill is computed from.
        """
        with self._write() as conn:
            return conn.execute(t.deployments.delete().where(_D.name == name)).rowcount > 0

    def _ensure_deployment(self, conn: Connection, name: str, now: float) -> Any:
        query = sa.select(t.deployments).where(_D.name == name)
        row = conn.execute(query).first()
        if row is None:
            conn.execute(t.deployments.insert().values(name=name, created_at=now, updated_at=now))
            row = conn.execute(query).one()
        return row

    # ---- revisions ---------------------------------------------------------------

    def add_revision(
        self,
        deployment: str,
        content_hash: str,
        *,
        config_text: str,
        artifact_path: str,
        apis: Sequence[ApiSpec],
        status: str = "pending",
        at: float | None = None,
    ) -> tuple[Revision, bool]:
        """Record a revision and its APIs; returns (revision, created).

        A hash the deployment already has is not recorded again: the existing revision
        comes back with created=False, which is how "redeploying an unchanged project
        is a no-op" is decided atomically. Creates the deployment if needed. Each API
        starts with requested_replicas = init_replicas.
        """
        now = self._now(at)
        with self._write() as conn:
            dep = self._ensure_deployment(conn, deployment, now)
            existing = self._revision_row(conn, deployment, content_hash)
            if existing is not None:
                return _revision(existing), False
            result = conn.execute(
                t.revisions.insert().values(
                    deployment_id=dep.id,
                    content_hash=content_hash,
                    created_at=now,
                    status=status,
                    error=None,
                    artifact_path=artifact_path,
                    config_text=config_text,
                )
            )
            revision_id = _new_id(result)
            if apis:
                conn.execute(
                    t.apis.insert(),
                    [
                        {
                            "revision_id": revision_id,
                            "name": a.name,
                            "version": a.version,
                            "min_replicas": a.min_replicas,
                            "max_replicas": a.max_replicas,
                            "init_replicas": a.init_replicas,
                            "requested_replicas": a.init_replicas,
                        }
                        for a in apis
                    ],
                )
            return _revision(self._revision_row(conn, deployment, content_hash)), True

    def get_revision(self, deployment: str, content_hash: str) -> Revision | None:
        with self._read() as conn:
            row = self._revision_row(conn, deployment, content_hash)
        return _revision(row) if row else None

    def list_revisions(self, deployment: str) -> list[Revision]:
        """The deployment's revisions, newest first."""
        query = _REVISIONS.where(_D.name == deployment).order_by(_R.created_at.desc(), _R.id.desc())
        with self._read() as conn:
            return [_revision(r) for r in conn.execute(query)]

    def set_revision_status(
        self, deployment: str, content_hash: str, status: str, error: str | None = None
    ) -> Revision:
        """Record a revision's rollout outcome ("live", "error", ...) and its error text."""
        with self._write() as conn:
            row = self._require_revision(conn, deployment, content_hash)
            conn.execute(
                t.revisions.update().where(_R.id == row.id).values(status=status, error=error)
            )
            return _revision(self._revision_row(conn, deployment, content_hash))

    def set_current_revision(
        self, deployment: str, content_hash: str, *, at: float | None = None
    ) -> Deployment:
        """Point the deployment at one of its revisions (after a rollout, or a rollback)."""
        with self._write() as conn:
            self._require_revision(conn, deployment, content_hash)
            conn.execute(
                t.deployments.update()
                .where(_D.name == deployment)
                .values(current_revision=content_hash, updated_at=self._now(at))
            )
            return _deployment(
                conn.execute(sa.select(t.deployments).where(_D.name == deployment)).one()
            )

    def _revision_row(self, conn: Connection, deployment: str, content_hash: str) -> Any:
        query = _REVISIONS.where(_D.name == deployment, _R.content_hash == content_hash)
        return conn.execute(query).first()

    def _require_revision(self, conn: Connection, deployment: str, content_hash: str) -> Any:
        row = self._revision_row(conn, deployment, content_hash)
        if row is None:
            raise NotFoundError(f"deployment {deployment!r} has no revision {content_hash!r}")
        return row

    # ---- APIs --------------------------------------------------------------------

    def list_apis(
        self, deployment: str | None = None, *, revision: str | None = None
    ) -> list[ApiRecord]:
        """APIs of each deployment's current revision (or of `revision`, given one)."""
        query = _APIS
        if deployment is not None:
            query = query.where(_D.name == deployment)
        if revision is not None:
            query = query.where(_R.content_hash == revision)
        else:
            query = query.where(_R.content_hash == _D.current_revision)
        query = query.order_by(_D.name, _A.name, _A.version)
        with self._read() as conn:
            return [_api(r) for r in conn.execute(query)]

    def ensure_revision_apis(
        self, deployment: str, content_hash: str, apis: Sequence[ApiSpec]
    ) -> int:
        """Re-declare APIs a revision lost to `delete_api` (a redeploy of the same hash).

        Returns how many were added back; existing rows keep their replica counts.
        """
        with self._write() as conn:
            row = self._require_revision(conn, deployment, content_hash)
            have = {
                (r.name, r.version)
                for r in conn.execute(
                    sa.select(_A.name, _A.version).where(_A.revision_id == row.id)
                )
            }
            missing = [a for a in apis if (a.name, a.version) not in have]
            if missing:
                conn.execute(
                    t.apis.insert(),
                    [
                        {
                            "revision_id": row.id,
                            "name": a.name,
                            "version": a.version,
                            "min_replicas": a.min_replicas,
                            "max_replicas": a.max_replicas,
                            "init_replicas": a.init_replicas,
                            "requested_replicas": a.init_replicas,
                        }
                        for a in missing
                    ],
                )
            return len(missing)

    def delete_api(self, deployment: str, name: str) -> int:
        """Remove every version of API `name` from the deployment's current revision."""
        with self._write() as conn:
            dep = conn.execute(sa.select(t.deployments).where(_D.name == deployment)).first()
            if dep is None or dep.current_revision is None:
                return 0
            row = self._revision_row(conn, deployment, dep.current_revision)
            if row is None:
                return 0
            return conn.execute(
                t.apis.delete().where(_A.revision_id == row.id, _A.name == name)
            ).rowcount

    def get_api(self, deployment: str, name: str, version: str = "") -> ApiRecord | None:
        """One API of the deployment's current revision."""
        with self._read() as conn:
            row = self._current_api(conn, deployment, name, version)
        return _api(row) if row else None

    def _current_api(self, conn: Connection, deployment: str, name: str, version: str) -> Any:
        query = _APIS.where(
            _D.name == deployment,
            _R.content_hash == _D.current_revision,
            _A.name == name,
            _A.version == version,
        )
        return conn.execute(query).first()

    # ---- scaling -------------------------------------------------------------------

    def scale_api(
        self,
        deployment: str,
        name: str,
        to_replicas: int,
        *,
        reason: str,
        version: str = "",
        at: float | None = None,
    ) -> ScalingEvent:
        """Set the current revision's requested replicas and log the event, atomically.

        After a crash the requested count and the last event therefore always agree.
        """
        now = self._now(at)
        with self._write() as conn:
            row = self._current_api(conn, deployment, name, version)
            if row is None:
                raise NotFoundError(f"no API {name!r} (version {version!r}) in {deployment!r}")
            conn.execute(
                t.apis.update().where(_A.id == row.id).values(requested_replicas=to_replicas)
            )
            previous = row.requested_replicas
            return self._insert_event(conn, now, name, version, previous, to_replicas, reason)

    def add_scaling_event(
        self,
        api: str,
        from_replicas: int,
        to_replicas: int,
        reason: str,
        *,
        version: str = "",
        at: float | None = None,
    ) -> ScalingEvent:
        """Log a scaling decision that changes no stored replica count."""
        with self._write() as conn:
            return self._insert_event(
                conn, self._now(at), api, version, from_replicas, to_replicas, reason
            )

    def scaling_events(
        self,
        api: str,
        *,
        version: str | None = None,
        since: float | None = None,
        limit: int = 100,
    ) -> list[ScalingEvent]:
        """The API's scaling events, newest first."""
        query = sa.select(t.scaling_events).where(_E.api == api)
        if version is not None:
            query = query.where(_E.version == version)
        if since is not None:
            query = query.where(_E.at >= since)
        query = query.order_by(_E.at.desc(), _E.id.desc()).limit(limit)
        with self._read() as conn:
            return [_event(r) for r in conn.execute(query)]

    def _insert_event(
        self,
        conn: Connection,
        at: float,
        api: str,
        version: str,
        from_replicas: int,
        to_replicas: int,
        reason: str,
    ) -> ScalingEvent:
        values = {
            "at": at,
            "api": api,
            "version": version,
            "from_replicas": from_replicas,
            "to_replicas": to_replicas,
            "reason": reason,
        }
        result = conn.execute(t.scaling_events.insert().values(**values))
        return ScalingEvent(_new_id(result), at, api, version, from_replicas, to_replicas, reason)


def _new_id(result: sa.CursorResult[Any]) -> int:
    """The primary key an INSERT of one row just made (SQLAlchemy types it optional)."""
    key = result.inserted_primary_key
    if key is None:
        raise RuntimeError("the database returned no primary key for a new row")
    return int(key[0])
