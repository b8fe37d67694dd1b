"""The live table definitions the store's queries use.

These mirror the schema that the migrations in `migrations.py` build, step by step;
a test reflects a migrated database and checks the two agree. Change a table by
adding a migration step AND editing its definition here, never one without the other.

Conventions (kept portable across SQLite and PostgreSQL):
- times are UTC epoch seconds (`Double`), bucket starts whole seconds (`BigInteger`);
- an API without a version has version "" (not NULL, so keys and uniqueness hold);
- counters are BigInteger and only ever changed with `col = col + :n` or an upsert.
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

schema_version = sa.Table(
    "schema_version",
    metadata,
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("description", sa.String(200), nullable=False),
    sa.Column("applied_at", sa.Double, nullable=False),
)

deployments = sa.Table(
    "deployments",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("name", sa.String(63), nullable=False, unique=True),
    sa.Column("current_revision", sa.String(128), nullable=True),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("updated_at", sa.Double, nullable=False),
)

revisions = sa.Table(
    "revisions",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column(
        "deployment_id",
        sa.Integer,
        sa.ForeignKey("deployments.id", ondelete="CASCADE"),
        nullable=False,
    ),
    sa.Column("content_hash", sa.String(128), nullable=False),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("status", sa.String(32), nullable=False),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("artifact_path", sa.Text, nullable=False),
    sa.Column("config_text", sa.Text, nullable=False),
    sa.UniqueConstraint("deployment_id", "content_hash", name="uq_revisions_hash"),
)

apis = sa.Table(
    "apis",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column(
        "revision_id", sa.Integer, sa.ForeignKey("revisions.id", ondelete="CASCADE"), nullable=False
    ),
    sa.Column("name", sa.String(63), nullable=False),
    sa.Column("version", sa.String(63), nullable=False),
    sa.Column("min_replicas", sa.Integer, nullable=False),
    sa.Column("max_replicas", sa.Integer, nullable=False),
    sa.Column("init_replicas", sa.Integer, nullable=False),
    sa.Column("requested_replicas", sa.Integer, nullable=False),
    sa.UniqueConstraint("revision_id", "name", "version", name="uq_apis_name"),
)

tracker_classes = sa.Table(
    "tracker_classes",
    metadata,
    sa.Column("api", sa.String(128), primary_key=True),
    sa.Column("version", sa.String(63), primary_key=True),
    sa.Column("bucket_start", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("label", sa.String(255), primary_key=True),
    sa.Column("count", sa.BigInteger, nullable=False),
)

tracker_values = sa.Table(
    "tracker_values",
    metadata,
    sa.Column("api", sa.String(128), primary_key=True),
    sa.Column("version", sa.String(63), primary_key=True),
    sa.Column("bucket_start", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("count", sa.BigInteger, nullable=False),
    sa.Column("min_value", sa.Double, nullable=False),
    sa.Column("max_value", sa.Double, nullable=False),
    sa.Column("sum_value", sa.Double, nullable=False),
    sa.Column("sum_squares", sa.Double, nullable=False),
)

tracker_histogram = sa.Table(
    "tracker_histogram",
    metadata,
    sa.Column("api", sa.String(128), primary_key=True),
    sa.Column("version", sa.String(63), primary_key=True),
    sa.Column("bucket_start", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("bin", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("count", sa.BigInteger, nullable=False),
)

usage_counts = sa.Table(
    "usage_counts",
    metadata,
    sa.Column("api", sa.String(128), primary_key=True),
    sa.Column("version", sa.String(63), primary_key=True),
    sa.Column("period_start", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("status_class", sa.String(3), primary_key=True),
    sa.Column("count", sa.BigInteger, nullable=False),
)

scaling_events = sa.Table(
    "scaling_events",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("at", sa.Double, nullable=False),
    sa.Column("api", sa.String(128), nullable=False),
    sa.Column("version", sa.String(63), nullable=False),
    sa.Column("from_replicas", sa.Integer, nullable=False),
    sa.Column("to_replicas", sa.Integer, nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Index("ix_scaling_events_api_at", "api", "at"),
)

# ---- accounts (migration "accounts") ---------------------------------------------------

users = sa.Table(
    "users",
    metadata,
    sa.Column("name", sa.String(63), primary_key=True),
    sa.Column("plan", sa.String(63), nullable=False),
    sa.Column("is_admin", sa.Boolean, nullable=False),
    sa.Column("created_at", sa.Double, nullable=False),
)

api_keys = sa.Table(
    "api_keys",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column(
        "user_name", sa.String(63), sa.ForeignKey("users.name", ondelete="CASCADE"), nullable=False
    ),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("hash", sa.String(64), nullable=False),
    sa.Column("scopes", sa.String(100), nullable=False),
    sa.Column("apis", sa.Text, nullable=True),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("expires_at", sa.Double, nullable=True),
    sa.Column("last_used_at", sa.Double, nullable=True),
    sa.Column("quota", sa.BigInteger, nullable=True),
    sa.Column("rate", sa.Double, nullable=True),
    sa.Column("burst", sa.Integer, nullable=True),
)

key_usage = sa.Table(
    "key_usage",
    metadata,
    sa.Column("user_name", sa.String(63), primary_key=True),
    sa.Column("key_id", sa.String(32), primary_key=True),
    sa.Column("api", sa.String(128), primary_key=True),
    sa.Column("version", sa.String(63), primary_key=True),
    sa.Column("period_start", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("status_class", sa.String(3), primary_key=True),
    sa.Column("count", sa.BigInteger, nullable=False),
)

# ---- issue 7: batch jobs and their durable queue (migration 2) ------------------------

batch_jobs = sa.Table(
    "batch_jobs",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("api", sa.String(63), nullable=False),
    sa.Column("status", sa.String(40), nullable=False),
    sa.Column("spec", sa.Text, nullable=False),  # the submitted job, as JSON
    sa.Column("plan", sa.Text, nullable=False),  # how workers run it (API snapshot), JSON
    sa.Column("workers", sa.Integer, nullable=False),
    sa.Column("max_receive_count", sa.Integer, nullable=False),
    sa.Column("visibility_timeout", sa.Double, nullable=False),
    sa.Column("timeout", sa.Double, nullable=True),
    sa.Column("created_at", sa.Double, nullable=False),
    sa.Column("started_at", sa.Double, nullable=True),
    sa.Column("ended_at", sa.Double, nullable=True),
    sa.Column("enqueued_batches", sa.BigInteger, nullable=False),
    sa.Column("enqueued_items", sa.BigInteger, nullable=False),
    sa.Column("enqueue_done", sa.Boolean, nullable=False),
    sa.Column("succeeded", sa.BigInteger, nullable=False),
    sa.Column("failed", sa.BigInteger, nullable=False),
    sa.Column("succeeded_items", sa.BigInteger, nullable=False),
    sa.Column("failed_items", sa.BigInteger, nullable=False),
    sa.Column("batch_seconds", sa.Double, nullable=False),
    sa.Column("completion", sa.String(16), nullable=False),  # pending | claimed | done
    sa.Column("completion_lease", sa.Double, nullable=True),
    sa.Column("error", sa.Text, nullable=True),
    sa.Index("ix_batch_jobs_api_created", "api", "created_at"),
)

batch_batches = sa.Table(
    "batch_batches",
    metadata,
    sa.Column(
        "job_id",
        sa.String(64),
        sa.ForeignKey("batch_jobs.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("idx", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("item_start", sa.BigInteger, nullable=False),
    sa.Column("item_count", sa.Integer, nullable=False),
    sa.Column("payload", sa.LargeBinary, nullable=False),
    sa.Column("visible_at", sa.Double, nullable=False),
    sa.Column("receive_count", sa.Integer, nullable=False),
    sa.Column("lease", sa.String(32), nullable=True),
    sa.Column("last_error", sa.Text, nullable=True),
)

batch_dead_letters = sa.Table(
    "batch_dead_letters",
    metadata,
    sa.Column(
        "job_id",
        sa.String(64),
        sa.ForeignKey("batch_jobs.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("idx", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("item_start", sa.BigInteger, nullable=False),
    sa.Column("item_count", sa.Integer, nullable=False),
    sa.Column("payload", sa.LargeBinary, nullable=False),
    sa.Column("receive_count", sa.Integer, nullable=False),
    sa.Column("error", sa.Text, nullable=False),
    sa.Column("at", sa.Double, nullable=False),
)

# ---- issue 18: per-minute API series and the console's audit log (migration 4) ---------

api_minutes = sa.Table(
    "api_minutes",
    metadata,
    sa.Column("api", sa.String(128), primary_key=True),
    sa.Column("minute", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("c2xx", sa.BigInteger, nullable=False),
    sa.Column("c4xx", sa.BigInteger, nullable=False),
    sa.Column("c5xx", sa.BigInteger, nullable=False),
    sa.Column("replicas", sa.Integer, nullable=True),
    sa.Column("queue", sa.Integer, nullable=True),
)

api_minute_latency = sa.Table(
    "api_minute_latency",
    metadata,
    sa.Column("api", sa.String(128), primary_key=True),
    sa.Column("minute", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("bucket", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("count", sa.BigInteger, nullable=False),
)

audit_log = sa.Table(
    "audit_log",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("at", sa.Double, nullable=False),
    sa.Column("user_name", sa.String(63), nullable=True),
    sa.Column("key_id", sa.String(32), nullable=True),
    sa.Column("action", sa.String(63), nullable=False),
    sa.Column("target", sa.String(255), nullable=False),
    sa.Column("status", sa.Integer, nullable=False),
    sa.Index("ix_audit_log_at", "at"),
)

api_traffic = sa.Table(
    "api_traffic",
    metadata,
    sa.Column("api", sa.String(128), primary_key=True),
    sa.Column("weights", sa.Text, nullable=False),  # JSON: {"version": weight}
    sa.Column("updated_at", sa.Double, nullable=False),
)

# ---- issue 14: shared quota counters for admission across processes (migration 7) ----

quota_counters = sa.Table(
    "quota_counters",
    metadata,
    sa.Column("subject", sa.String(80), primary_key=True),  # "user:<name>" or "key:<id>"
    sa.Column("period_start", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("used", sa.BigInteger, nullable=False),
)
