"""What the server opens before its ports answer: the home's lock and the state it keeps.

Apart from `server.py` because it is the server's durable side, done once at
start and in one order: the lock on KILN_HOME (one server per home), the state
store (SQLite or `$KILN_STATE_URL`), the counters and per-minute history flushed
to it, users, keys and quotas with API keys on (the admin key written on first
start), the deployment manager, and the Batch and Async APIs' managers. Every
failure is a `ServerError` saying what and where, before any API is loaded.
`server` is the `InferenceServer`, typed `Any`: naming it would import
`server.py` back, a cycle.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from kiln.control.host import ServerError, lock_home


def open_state(server: Any) -> None:
    """Take the home's lock, open the state store and the deployment manager.

    Fills the server's `home_lock` (held as long as the server lives), `store`,
    `counters`, `series`, `deployments`, `jobs` (and `accounts`, `quotas`,
    `admin_key_file` with auth on)."""
    from kiln.control.deployments import DeploymentManager
    from kiln.control.durable import DurableCounters
    from kiln.control.store import Store, default_url

    home = server.options.home
    home.mkdir(parents=True, exist_ok=True)
    server.home_lock = lock_home(home)
    url = server.options.store_url or os.environ.get("KILN_STATE_URL") or default_url(home)
    try:
        server.store = Store(url)
    except Exception as exc:  # noqa: BLE001 - say what and where
        raise ServerError(f"cannot open the state store at {url}: {exc}") from None
    server.counters = DurableCounters(server.store)
    if server.options.auth:
        _open_accounts(server, home)
    server.metrics.monitor = server.counters
    server.metrics.usage = server.counters
    from kiln.control.metrics import LATENCY_BUCKETS
    from kiln.control.timeseries import TimeSeries

    server.series = TimeSeries(server.store, server.registry, LATENCY_BUCKETS)
    server.metrics.series = server.series
    server.deployments = DeploymentManager(server, server.store, home)
    _open_jobs(server, home)


def _open_jobs(server: Any, home: Path) -> None:
    """Batch APIs (issue 7): the served project's, with their unfinished jobs resumed."""
    from kiln.batch.manager import JobManager

    server.jobs = JobManager(server.store, home / "logs", api_log=server.log)
    server.jobs.sandbox = server.sandbox  # batch workers start like realtime ones
    if server.project is not None:
        for batch_api in server.project.batch_apis:
            server.jobs.register(batch_api, server.project.root)
    from kiln.control.asyncs import AsyncManager

    server.jobs.asyncs = AsyncManager(
        server.store, server.registry, server.log, server.options.webhook_allow
    )


def _open_accounts(server: Any, home: Path) -> None:
    """Users, keys and quotas; on first start, the admin and its key (file mode 0600)."""
    from kiln.control.accounts import Accounts
    from kiln.control.quotas import QuotaGate, load_plans

    server.accounts = Accounts(server.store)
    server.quotas = QuotaGate(server.store, server.accounts, load_plans(home))
    key_file = home / "admin.key"
    if server.options.admin_key:
        server.accounts.ensure_admin_key(server.options.admin_key)
        server.metrics.key_totals = server.quotas.key_totals
        return
    new_key = server.accounts.ensure_admin()
    if new_key is not None:
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(new_key + "\n")
    server.admin_key_file = key_file
    server.metrics.key_totals = server.quotas.key_totals
