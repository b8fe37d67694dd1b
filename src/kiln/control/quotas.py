"""Plans, quotas, rate limits and metering: who may make one more call, and what it cost.

What counts as a call: a request that passed authentication, reached an API the
key may use, and was admitted by the quota and the rate limit, whatever status
the API then answered (the Hub counts invocations). A request refused by auth,
by a missing or hidden API, or by the quota or rate limit itself never counts.
The rule is the same on every protocol because it is applied in one place, the
HTTP gate in front of every adapter.

Counting is exact under concurrency: admission checks and increments the
counters in one synchronous step on the event loop (no await in between), so N
clients racing for the last call of a quota Q get exactly Q admissions. The
counters start from the store's usage records at server start and the metered
rows are flushed every second (`flush`), so a crash loses at most a second of
records and a restart never counts a call twice.

Periods are calendar months in UTC. `X-RateLimit-Reset` is the number of
seconds until the period (or, for a rate limit, the next token) resets.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import math
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kiln.control.accounts import Principal
from kiln.errors import TooManyRequests

log = logging.getLogger("kiln.quotas")


@dataclass(frozen=True)
class Plan:
    """What a user may have and use; None: no bound. The admin has no plan (never limited)."""

    name: str
    apis: int | None  # APIs a user may have
    calls_per_month: int | None
    max_replicas: int | None = None  # replicas of one API (and workers of one batch job)
    max_replica_mem: int | None = None  # bytes of compute.mem per replica (the default too)
    max_upload_bytes: int | None = None  # one deploy upload, as sent (gzip'd tar)
    max_unpacked_bytes: int | None = None  # one deploy, unpacked
    network_egress: bool = False  # may an API declare `network: egress`


MIB = 1 << 20
DEFAULT_PLANS = {
    "free": Plan("free", 5, 1000, 2, 2048 * MIB, 100 * MIB, 500 * MIB, False),  # seed 003
    "pro": Plan("pro", 50, 1_000_000, 8, 8192 * MIB, 1024 * MIB, 4096 * MIB, False),
    "unlimited": Plan("unlimited", None, None, None, None, None, None, True),
}
_SIZES = ("max_replica_mem", "max_upload_bytes", "max_unpacked_bytes")


def load_plans(home: Path) -> dict[str, Plan]:
    """The default plans, overridden or extended by `<KILN_HOME>/plans.yaml`.

    plans.yaml: `{name: {apis: 5, calls_per_month: 1000, max_replicas: 2,
    max_replica_mem: 2Gi, max_upload_bytes: 100Mi, max_unpacked_bytes: 500Mi,
    network_egress: false}}`. A key left out keeps its value from the built-in
    plan of that name, or from `free` for a new plan; null means no bound.
    """
    plans = dict(DEFAULT_PLANS)
    path = home / "plans.yaml"
    if path.is_file():
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of plan names to their limits")
        for name, spec in data.items():
            plans[str(name)] = _plan(str(name), spec or {}, plans.get(str(name)), path)
    return plans


def _plan(name: str, spec: Any, base: Plan | None, path: Path) -> Plan:
    from dataclasses import fields, replace

    from kiln.quantities import parse_bytes

    known = [f.name for f in fields(Plan) if f.name != "name"]
    if not isinstance(spec, dict) or set(spec) - set(known):
        extra = sorted(set(spec) - set(known)) if isinstance(spec, dict) else spec
        raise ValueError(
            f"{path}: plan '{name}' has unknown settings {extra}; the settings are "
            f"{', '.join(known)}"
        )
    values: dict[str, Any] = {}
    for key, value in spec.items():
        try:
            if key == "network_egress":
                if not isinstance(value, bool):
                    raise ValueError("write true or false")
                values[key] = value
            elif value is None:
                values[key] = None
            elif key in _SIZES:
                values[key] = parse_bytes(value, what=key)
            elif isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError("write a whole number, or null for no bound")
            else:
                values[key] = value
        except Exception as exc:  # noqa: BLE001 - FieldProblem or ValueError, reworded
            raise ValueError(f"{path}: plan '{name}': {key}={value!r}: {exc}") from None
    return replace(base or DEFAULT_PLANS["free"], name=name, **values)


def month_bounds(now: float) -> tuple[float, float]:
    """(start, end) of the UTC calendar month holding `now`."""
    day = dt.datetime.fromtimestamp(now, dt.UTC)
    start = dt.datetime(day.year, day.month, 1, tzinfo=dt.UTC)
    end = dt.datetime(day.year + (day.month == 12), day.month % 12 + 1, 1, tzinfo=dt.UTC)
    return start.timestamp(), end.timestamp()


class _Bucket:
    """A token bucket: `rate` tokens a second, at most `burst` saved up."""

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate, self.burst, self.tokens, self.at = rate, burst, float(burst), now

    def take(self, now: float) -> float:
        """0 when a token was taken; else seconds until one is available."""
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


class QuotaGate:
    """Admission (quota and rate limit) and the metering of admitted calls."""

    def __init__(self, store: Any, accounts: Any, plans: dict[str, Plan], clock: Any = time.time):
        self.store = store
        self.accounts = accounts
        self.plans = plans
        self._clock = clock
        self._lock = threading.Lock()
        # One flush at a time: a reader's flush must not return while another thread's
        # flush still holds rows it took from `_pending` but has not yet written.
        self._flush_lock = threading.Lock()
        self._pending: dict[tuple[str, str, str, str, str], int] = defaultdict(int)
        self._buckets: dict[str, _Bucket] = {}
        self._period = (0.0, 0.0)
        self.by_user: dict[str, int] = {}
        self.by_key: dict[str, int] = {}
        self.key_totals: dict[tuple[str, str, str], int] = defaultdict(int)  # Prometheus
        # Calls refused with 429 by a quota or rate limit, per key, this month: never
        # metered (no store row), so counted here for `GET /usage` (since server start).
        self.refused_by_key: dict[str, int] = defaultdict(int)
        self._roll(self._clock())

    def _roll(self, now: float) -> None:
        """Start counting a new month (at start, and when a month ends)."""
        self._period = month_bounds(now)
        by_user, by_key = self.store.calls_since(self._period[0])
        self.by_user, self.by_key = defaultdict(int, by_user), defaultdict(int, by_key)
        self.refused_by_key = defaultdict(int)

    def plan_of(self, user: str) -> Plan:
        record = self.accounts.users.get(user)
        return self.plans.get(record.plan if record else "free", DEFAULT_PLANS["free"])

    def plan_of_api(self, api_name: str) -> Plan | None:
        """The plan of the user owning API `<user>.<name>`; None for the admin's APIs."""
        user = api_name.split(".", 1)[0] if "." in api_name else None
        if user is None or user not in self.accounts.users:
            return None
        return self.plan_of(user)

    def replica_caps_for(self, api_name: str) -> list[Any]:
        """The plan's bound on one API's replicas, as a `Cap` (management `PUT /models`)."""
        from kiln.serving.caps import Cap

        plan = self.plan_of_api(api_name)
        if plan is None or plan.max_replicas is None:
            return []
        return [Cap(plan.max_replicas, f"the '{plan.name}' plan's max_replicas")]

    def admit(self, principal: Principal) -> dict[str, str]:
        """Count one call for the principal, or raise 429; returns the X-RateLimit headers."""
        now = self._clock()
        if now >= self._period[1]:
            self._roll(now)
        key = self.accounts.keys.get(principal.key_id)
        limits: list[tuple[int, int, str]] = []  # (limit, used, what)
        plan = None if principal.is_admin else self.plan_of(principal.user)
        if plan is not None and plan.calls_per_month is not None:
            limits.append(
                (
                    plan.calls_per_month,
                    self.by_user[principal.user],
                    f"the '{plan.name}' plan's {plan.calls_per_month} calls a month",
                )
            )
        if key is not None and key.quota is not None:
            limits.append(
                (
                    key.quota,
                    self.by_key[key.id],
                    f"key {key.id}'s quota of {key.quota} calls a month",
                )
            )
        reset = max(1, math.ceil(self._period[1] - now))
        headers: dict[str, str] = {}
        if limits:
            limit, used, what = min(limits, key=lambda item: item[0] - item[1])
            remaining = limit - used
            headers = {
                "X-RateLimit-Limit": str(limit),
                "X-RateLimit-Remaining": str(max(0, remaining - 1)),
                "X-RateLimit-Reset": str(reset),
            }
            if remaining <= 0:
                raise self._quota_refused(principal.key_id, what, reset, headers)
        if key is not None and key.rate:
            self._take_rate(key, now)
        self.by_user[principal.user] += 1
        self.by_key[principal.key_id] += 1
        return headers

    def _quota_refused(
        self, key_id: str, what: str, reset: int, headers: dict[str, str]
    ) -> TooManyRequests:
        """The 429 of a used-up monthly quota (counted as refused for `GET /usage`)."""
        self.refused_by_key[key_id] += 1
        err = TooManyRequests(
            f"quota exceeded: {what} are used up; it resets at the start of next month "
            f"(UTC), in {reset} s",
            retry_after=reset,
        )
        err.headers = {**headers, "X-RateLimit-Remaining": "0"}  # type: ignore[attr-defined]
        return err

    def _take_rate(self, key: Any, now: float) -> None:
        """Take a token of the key's rate limit (this process's bucket), or raise 429."""
        bucket = self._buckets.get(key.id)
        if bucket is None or bucket.rate != key.rate:
            bucket = self._buckets[key.id] = _Bucket(key.rate, key.burst or 1, now)
        wait = bucket.take(now)
        if wait:
            self.refused_by_key[key.id] += 1
            retry = max(1, math.ceil(wait))
            err = TooManyRequests(
                f"rate limit exceeded: key {key.id} allows {key.rate:g} requests a second "
                f"(bursts of {key.burst}); retry in {retry} s",
                retry_after=retry,
            )
            err.headers = {  # type: ignore[attr-defined]
                "X-RateLimit-Limit": f"{key.rate:g}",
                "X-RateLimit-Remaining": "0",
                "X-RateLimit-Reset": str(retry),
            }
            raise err

    def record(self, principal: Principal, api: str, version: str, status: int) -> None:
        """Meter an admitted call once its status is known (flushed to the store each second)."""
        status_class = f"{status // 100}xx"
        with self._lock:
            self._pending[(principal.user, principal.key_id, api, version, status_class)] += 1
        self.key_totals[(principal.key_id, principal.user, status_class)] += 1

    def flush(self) -> None:
        with self._flush_lock:
            self._flush()

    def _flush(self) -> None:
        from kiln.control.store.accounts import KeyUsageIncrement

        with self._lock:
            pending, self._pending = self._pending, defaultdict(int)
        if not pending:
            return
        try:
            self.store.add_key_usage_many(
                KeyUsageIncrement(user, key, api, status, n, version)
                for (user, key, api, version, status), n in pending.items()
            )
        except Exception:  # noqa: BLE001 - keep the counts for the next flush
            with self._lock:
                for k, n in pending.items():
                    self._pending[k] += n

    async def run(self) -> None:
        """Every second: write usage and last-used times, and pick up key changes.

        A store error (a locked SQLite, a PostgreSQL restart) skips one tick; it must
        not end the loop, or keys disabled later would keep working.
        """
        while True:
            await asyncio.sleep(1.0)
            for step in (self.flush, self.accounts.flush_last_used, self.accounts.reload):
                try:
                    await asyncio.to_thread(step)
                except Exception as exc:  # noqa: BLE001 - retried next tick
                    log.warning("accounts: %s failed, retrying in 1 s: %s", step.__name__, exc)
