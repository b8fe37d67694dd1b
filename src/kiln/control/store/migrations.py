"""Versioned schema: an ordered list of migration steps and the runner that applies them.

Why a small built-in runner rather than Alembic: the store has one owner and a short,
linear history; plain functions over a Connection are easy to read, run inside the
same transaction as the version bump, and need no config files or env scripts.

How it works: the `schema_version` table holds one row per applied step (version,
description, time). Opening a store runs `upgrade()`: in ONE write transaction (an
IMMEDIATE transaction on SQLite, an advisory lock on PostgreSQL, so two processes
opening a fresh store at once do not both migrate) it reads the highest applied
version, refuses a database newer than the code (`SchemaTooNewError`), then applies
each pending step in order and records it. A failing step rolls the whole upgrade
back, leaving the database at its old version.

Adding a table later (issue 6's users/keys/quotas, issue 7's jobs and batch queue):
write `def _v2(conn)` that creates it with its own frozen `sa.Table` definitions
(never the live ones in `schema.py`, which describe the newest shape), append
`Migration(2, "...", _v2)` to MIGRATIONS, and add the live definition to `schema.py`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from .engine import WRITE_OPTION, lock_for_migration
from .models import SchemaTooNewError, StoreError


@dataclass(frozen=True)
class Migration:
    """One schema step: `upgrade(conn)` runs inside the upgrade's transaction."""

    version: int
    description: str
    upgrade: Callable[[Connection], None]


def _version_table(md: sa.MetaData) -> sa.Table:
    # Frozen: the runner itself depends on this shape, so it never changes.
    return sa.Table(
        "schema_version",
        md,
        sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("description", sa.String(200), nullable=False),
        sa.Column("applied_at", sa.Double, nullable=False),
    )


def _v1(conn: Connection) -> None:
    """Issue 5's control plane: deployments, revisions, APIs, tracker, usage, scaling."""
    md = sa.MetaData()
    C = sa.Column
    sa.Table(
        "deployments",
        md,
        C("id", sa.Integer, primary_key=True),
        C("name", sa.String(63), nullable=False, unique=True),
        C("current_revision", sa.String(128), nullable=True),
        C("created_at", sa.Double, nullable=False),
        C("updated_at", sa.Double, nullable=False),
    )
    sa.Table(
        "revisions",
        md,
        C("id", sa.Integer, primary_key=True),
        C(
            "deployment_id",
            sa.Integer,
            sa.ForeignKey("deployments.id", ondelete="CASCADE"),
            nullable=False,
        ),
        C("content_hash", sa.String(128), nullable=False),
        C("created_at", sa.Double, nullable=False),
        C("status", sa.String(32), nullable=False),
        C("error", sa.Text, nullable=True),
        C("artifact_path", sa.Text, nullable=False),
        C("config_text", sa.Text, nullable=False),
        sa.UniqueConstraint("deployment_id", "content_hash", name="uq_revisions_hash"),
    )
    sa.Table(
        "apis",
        md,
        C("id", sa.Integer, primary_key=True),
        C(
            "revision_id",
            sa.Integer,
            sa.ForeignKey("revisions.id", ondelete="CASCADE"),
            nullable=False,
        ),
        C("name", sa.String(63), nullable=False),
        C("version", sa.String(63), nullable=False),
        C("min_replicas", sa.Integer, nullable=False),
        C("max_replicas", sa.Integer, nullable=False),
        C("init_replicas", sa.Integer, nullable=False),
        C("requested_replicas", sa.Integer, nullable=False),
        sa.UniqueConstraint("revision_id", "name", "version", name="uq_apis_name"),
    )

    def series_key() -> list[sa.Column]:
        return [
            C("api", sa.String(128), primary_key=True),
            C("version", sa.String(63), primary_key=True),
            C("bucket_start", sa.BigInteger, primary_key=True, autoincrement=False),
        ]

    sa.Table(
        "tracker_classes",
        md,
        *series_key(),
        C("label", sa.String(255), primary_key=True),
        C("count", sa.BigInteger, nullable=False),
    )
    sa.Table(
        "tracker_values",
        md,
        *series_key(),
        C("count", sa.BigInteger, nullable=False),
        C("min_value", sa.Double, nullable=False),
        C("max_value", sa.Double, nullable=False),
        C("sum_value", sa.Double, nullable=False),
        C("sum_squares", sa.Double, nullable=False),
    )
    sa.Table(
        "tracker_histogram",
        md,
        *series_key(),
        C("bin", sa.Integer, primary_key=True, autoincrement=False),
        C("count", sa.BigInteger, nullable=False),
    )
    sa.Table(
        "usage_counts",
        md,
        C("api", sa.String(128), primary_key=True),
        C("version", sa.String(63), primary_key=True),
        C("period_start", sa.BigInteger, primary_key=True, autoincrement=False),
        C("status_class", sa.String(3), primary_key=True),
        C("count", sa.BigInteger, nullable=False),
    )
    sa.Table(
        "scaling_events",
        md,
        C("id", sa.Integer, primary_key=True),
        C("at", sa.Double, nullable=False),
        C("api", sa.String(128), nullable=False),
        C("version", sa.String(63), nullable=False),
        C("from_replicas", sa.Integer, nullable=False),
        C("to_replicas", sa.Integer, nullable=False),
        C("reason", sa.Text, nullable=False),
        sa.Index("ix_scaling_events_api_at", "api", "at"),
    )
    md.create_all(conn)


def _accounts(conn: Connection) -> None:
    """Issue 6's accounts: users, API keys (hashes only) and metered usage per key."""
    md = sa.MetaData()
    C = sa.Column
    sa.Table(
        "users",
        md,
        C("name", sa.String(63), primary_key=True),
        C("plan", sa.String(63), nullable=False),
        C("is_admin", sa.Boolean, nullable=False),
        C("created_at", sa.Double, nullable=False),
    )
    sa.Table(
        "api_keys",
        md,
        C("id", sa.String(32), primary_key=True),
        C(
            "user_name",
            sa.String(63),
            sa.ForeignKey("users.name", ondelete="CASCADE"),
            nullable=False,
        ),
        C("name", sa.String(200), nullable=False),
        C("hash", sa.String(64), nullable=False),
        C("scopes", sa.String(100), nullable=False),
        C("apis", sa.Text, nullable=True),
        C("status", sa.String(16), nullable=False),
        C("created_at", sa.Double, nullable=False),
        C("expires_at", sa.Double, nullable=True),
        C("last_used_at", sa.Double, nullable=True),
        C("quota", sa.BigInteger, nullable=True),
        C("rate", sa.Double, nullable=True),
        C("burst", sa.Integer, nullable=True),
    )
    sa.Table(
        "key_usage",
        md,
        C("user_name", sa.String(63), primary_key=True),
        C("key_id", sa.String(32), primary_key=True),
        C("api", sa.String(128), primary_key=True),
        C("version", sa.String(63), primary_key=True),
        C("period_start", sa.BigInteger, primary_key=True, autoincrement=False),
        C("status_class", sa.String(3), primary_key=True),
        C("count", sa.BigInteger, nullable=False),
    )
    md.create_all(conn)


def _v2(conn: Connection) -> None:
    """Issue 7's Batch API: jobs, their queued batches and the dead-letter set."""
    md = sa.MetaData()
    C = sa.Column
    sa.Table(
        "batch_jobs",
        md,
        C("id", sa.String(64), primary_key=True),
        C("api", sa.String(63), nullable=False),
        C("status", sa.String(40), nullable=False),
        C("spec", sa.Text, nullable=False),
        C("plan", sa.Text, nullable=False),
        C("workers", sa.Integer, nullable=False),
        C("max_receive_count", sa.Integer, nullable=False),
        C("visibility_timeout", sa.Double, nullable=False),
        C("timeout", sa.Double, nullable=True),
        C("created_at", sa.Double, nullable=False),
        C("started_at", sa.Double, nullable=True),
        C("ended_at", sa.Double, nullable=True),
        C("enqueued_batches", sa.BigInteger, nullable=False),
        C("enqueued_items", sa.BigInteger, nullable=False),
        C("enqueue_done", sa.Boolean, nullable=False),
        C("succeeded", sa.BigInteger, nullable=False),
        C("failed", sa.BigInteger, nullable=False),
        C("succeeded_items", sa.BigInteger, nullable=False),
        C("failed_items", sa.BigInteger, nullable=False),
        C("batch_seconds", sa.Double, nullable=False),
        C("completion", sa.String(16), nullable=False),
        C("completion_lease", sa.Double, nullable=True),
        C("error", sa.Text, nullable=True),
        sa.Index("ix_batch_jobs_api_created", "api", "created_at"),
    )

    def batch_key() -> list[sa.Column]:
        return [
            C(
                "job_id",
                sa.String(64),
                sa.ForeignKey("batch_jobs.id", ondelete="CASCADE"),
                primary_key=True,
            ),
            C("idx", sa.BigInteger, primary_key=True, autoincrement=False),
            C("item_start", sa.BigInteger, nullable=False),
            C("item_count", sa.Integer, nullable=False),
            C("payload", sa.LargeBinary, nullable=False),
        ]

    sa.Table(
        "batch_batches",
        md,
        *batch_key(),
        C("visible_at", sa.Double, nullable=False),
        C("receive_count", sa.Integer, nullable=False),
        C("lease", sa.String(32), nullable=True),
        C("last_error", sa.Text, nullable=True),
    )
    sa.Table(
        "batch_dead_letters",
        md,
        *batch_key(),
        C("receive_count", sa.Integer, nullable=False),
        C("error", sa.Text, nullable=False),
        C("at", sa.Double, nullable=False),
    )
    md.create_all(conn)


def _series(conn: Connection) -> None:
    """Issue 18: per-API per-minute aggregates (kept 25 h) and the console's audit log."""
    md = sa.MetaData()
    C = sa.Column
    sa.Table(
        "api_minutes",
        md,
        C("api", sa.String(128), primary_key=True),
        C("minute", sa.BigInteger, primary_key=True, autoincrement=False),
        C("c2xx", sa.BigInteger, nullable=False),
        C("c4xx", sa.BigInteger, nullable=False),
        C("c5xx", sa.BigInteger, nullable=False),
        C("replicas", sa.Integer, nullable=True),
        C("queue", sa.Integer, nullable=True),
    )
    sa.Table(
        "api_minute_latency",
        md,
        C("api", sa.String(128), primary_key=True),
        C("minute", sa.BigInteger, primary_key=True, autoincrement=False),
        C("bucket", sa.Integer, primary_key=True, autoincrement=False),
        C("count", sa.BigInteger, nullable=False),
    )
    sa.Table(
        "audit_log",
        md,
        C("id", sa.Integer, primary_key=True),
        C("at", sa.Double, nullable=False),
        C("user_name", sa.String(63), nullable=True),
        C("key_id", sa.String(32), nullable=True),
        C("action", sa.String(63), nullable=False),
        C("target", sa.String(255), nullable=False),
        C("status", sa.Integer, nullable=False),
        sa.Index("ix_audit_log_at", "at"),
    )
    md.create_all(conn)


def _async_requests(conn: Connection) -> None:
    """Issue 19's AsyncAPIs: accepted requests, their leases, results and webhook state."""
    md = sa.MetaData()
    C = sa.Column
    sa.Table(
        "async_requests",
        md,
        C("id", sa.String(64), primary_key=True),
        C("api", sa.String(128), nullable=False),
        C("version", sa.String(63), nullable=False),
        C("status", sa.String(16), nullable=False),
        C("body", sa.LargeBinary, nullable=False),
        C("content_type", sa.String(255), nullable=False),
        C("created_at", sa.Double, nullable=False),
        C("updated_at", sa.Double, nullable=False),
        C("visible_at", sa.Double, nullable=False),
        C("lease", sa.String(32), nullable=True),
        C("receive_count", sa.Integer, nullable=False),
        C("result_ttl", sa.Double, nullable=False),
        C("expires_at", sa.Double, nullable=True),
        C("result", sa.LargeBinary, nullable=True),
        C("result_type", sa.String(255), nullable=True),
        C("error", sa.Text, nullable=True),
        C("webhook", sa.Text, nullable=True),
        C("webhook_state", sa.String(16), nullable=True),
        C("webhook_error", sa.Text, nullable=True),
        sa.Index("ix_async_requests_visible", "status", "visible_at"),
        sa.Index("ix_async_requests_expires", "expires_at"),
    )
    md.create_all(conn)


def _traffic(conn: Connection) -> None:
    """Issue 19's traffic splits: the runtime split of an API, kept across restarts."""
    md = sa.MetaData()
    C = sa.Column
    sa.Table(
        "api_traffic",
        md,
        C("api", sa.String(128), primary_key=True),
        C("weights", sa.Text, nullable=False),
        C("updated_at", sa.Double, nullable=False),
    )
    md.create_all(conn)


def _quota_counters(conn: Connection) -> None:
    """Issue 14's shared admission: monthly quota counters that many ingresses decide on."""
    md = sa.MetaData()
    C = sa.Column
    sa.Table(
        "quota_counters",
        md,
        C("subject", sa.String(80), primary_key=True),
        C("period_start", sa.BigInteger, primary_key=True, autoincrement=False),
        C("used", sa.BigInteger, nullable=False),
    )
    md.create_all(conn)


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "control plane: deployments, revisions, APIs, tracker, usage, scaling", _v1),
    Migration(2, "batch jobs: jobs, batches, dead letters", _v2),
    Migration(3, "accounts: users, API keys, metered usage per key", _accounts),
    Migration(4, "console: per-minute API series, audit log", _series),
    Migration(5, "async APIs: requests, their results and webhooks", _async_requests),
    Migration(6, "traffic splits: runtime weights per API", _traffic),
    Migration(7, "shared quota counters: admission decided by the store", _quota_counters),
)


def latest_version(migrations: Sequence[Migration] = MIGRATIONS) -> int:
    """The schema version this code writes."""
    return migrations[-1].version if migrations else 0


def current_version(engine: Engine) -> int:
    """The database's schema version (0 for an empty database)."""
    with engine.connect() as conn, conn.begin():
        return _read_version(conn)


def _read_version(conn: Connection) -> int:
    if not sa.inspect(conn).has_table("schema_version"):
        return 0
    table = _version_table(sa.MetaData())
    return int(conn.execute(sa.select(sa.func.max(table.c.version))).scalar() or 0)


def upgrade(engine: Engine, migrations: Sequence[Migration] = MIGRATIONS) -> int:
    """Bring the database up to the newest step; returns the resulting version."""
    _check_order(migrations)
    latest = latest_version(migrations)
    with engine.connect() as conn:
        conn.execution_options(**{WRITE_OPTION: True})
        with conn.begin():
            lock_for_migration(conn)
            table = _version_table(sa.MetaData())
            table.create(conn, checkfirst=True)
            current = _read_version(conn)
            if current > latest:
                where = engine.url.render_as_string(hide_password=True)
                raise SchemaTooNewError(
                    f"the state store {where} has schema version {current}, but this Kiln "
                    f"only knows versions up to {latest}: it was written by a newer Kiln. "
                    "Upgrade Kiln, or point KILN_HOME (or the store URL) elsewhere; "
                    "the database was left untouched."
                )
            for step in migrations:
                if step.version <= current:
                    continue
                step.upgrade(conn)
                conn.execute(
                    table.insert().values(
                        version=step.version, description=step.description, applied_at=time.time()
                    )
                )
    return latest


def _check_order(migrations: Sequence[Migration]) -> None:
    expected = list(range(1, len(migrations) + 1))
    if [m.version for m in migrations] != expected:
        raise StoreError("migration versions must be 1, 2, 3, ... in order, without gaps")
