"""Kiln's state store: the one module through which all durable state goes.

SQLite (`<KILN_HOME>/state.db`, WAL) by default, PostgreSQL when several machines share
a control plane. Open a `Store`; it upgrades the schema (see `migrations.py`) and
refuses a database written by a newer Kiln. Methods are synchronous and short; from
asyncio, call them through `asyncio.to_thread`.
"""

from .counters import TRACKER_BUCKET_S, USAGE_PERIOD_S, status_class
from .engine import default_url, kiln_home
from .migrations import MIGRATIONS, Migration, current_version, latest_version
from .models import (
    ApiRecord,
    ApiSpec,
    Deployment,
    NotFoundError,
    RegressionSummary,
    Revision,
    ScalingEvent,
    SchemaTooNewError,
    StoreError,
    UsageIncrement,
    UsageRow,
)
from .series import MINUTE_S, AuditEntry, MinuteDelta, MinuteRow, percentile_bucket
from .store import Store

__all__ = [
    "MINUTE_S",
    "AuditEntry",
    "MinuteDelta",
    "MinuteRow",
    "percentile_bucket",
    "MIGRATIONS",
    "TRACKER_BUCKET_S",
    "USAGE_PERIOD_S",
    "ApiRecord",
    "ApiSpec",
    "Deployment",
    "Migration",
    "NotFoundError",
    "RegressionSummary",
    "Revision",
    "ScalingEvent",
    "SchemaTooNewError",
    "Store",
    "StoreError",
    "UsageIncrement",
    "UsageRow",
    "current_version",
    "default_url",
    "kiln_home",
    "latest_version",
    "status_class",
]
