"""Admission decided by the shared store, for many ingress processes (Ray Serve's ingress).

`QuotaGate` (quotas.py) counts admissions in memory: exact within one process, and
free (no I/O on the hot path), which is right for `kiln serve` and a local `kiln
server`. Behind Ray Serve, several `KilnIngress` replicas admit calls for the same
users and keys at once, so per-process counters would let each of them grant the
whole quota. `SharedQuotaGate` decides the monthly quota in the store instead: one
write transaction per admitted call (`Store.take_quota`: a conditional
`UPDATE ... SET used = used + 1 WHERE used < limit` per user and key counter), so
any number of processes on one PostgreSQL never admit more than the quota.

Costs and limits, by design:
- one short transaction per call, on the event loop (DataPlane.admit is
  synchronous): about a millisecond against a PostgreSQL on the same network;
- rate limits (requests per second, token buckets) stay per process: with N
  ingress replicas a key gets up to N times its rate (the proxy spreads calls);
- a call refused by the rate limit never reaches the store; the rate token is taken
  before the quota is counted, so a call refused by the quota still spends a token;
- when the store cannot be reached, calls are refused with 503 (fail closed).
Metering (`record`, `flush`) and the 1 s key reload are QuotaGate's own.
"""

from __future__ import annotations

import math
from typing import Any

from kiln.control.accounts import Accounts, Principal
from kiln.control.quotas import QuotaGate, load_plans, month_bounds
from kiln.errors import Unavailable


class SharedQuotaGate(QuotaGate):
    """A QuotaGate whose monthly quotas are checked and counted in the shared store."""

    def _roll(self, now: float) -> None:
        # The store holds the counts; nothing to rebuild in memory at a month's start.
        self._period = month_bounds(now)
        self.refused_by_key.clear()

    def admit(self, principal: Principal) -> dict[str, str]:
        """Count one call in the store for the principal's user and key, or raise 429."""
        now = self._clock()
        if now >= self._period[1]:
            self._roll(now)
        if principal.is_admin:
            return {}
        key = self.accounts.keys.get(principal.key_id)
        if key is not None and key.rate:
            self._take_rate(key, now)  # per process (see the module docstring)
        plan = self.plan_of(principal.user)
        user_subject, key_subject = f"user:{principal.user}", f"key:{principal.key_id}"
        limits = {
            user_subject: (
                plan.calls_per_month,
                f"the '{plan.name}' plan's {plan.calls_per_month} calls a month",
            ),
            key_subject: (
                key.quota if key is not None else None,
                f"key {principal.key_id}'s quota of {key.quota if key else 0} calls a month",
            ),
        }
        try:
            admitted, used = self.store.take_quota(
                int(self._period[0]), [(s, limit) for s, (limit, _) in limits.items()]
            )
        except Exception as exc:  # noqa: BLE001 - the store is down: refuse, never guess
            raise Unavailable(
                "admission could not be decided: the shared state store cannot be reached; "
                "retry shortly",
                retry_after=1,
            ) from exc
        self.by_user[principal.user] = used.get(user_subject, 0)
        self.by_key[principal.key_id] = used.get(key_subject, 0)
        bounded = [
            (limit - used.get(s, 0), limit, what, s)
            for s, (limit, what) in limits.items()
            if limit is not None
        ]
        if not bounded:
            return {}
        remaining, limit, what, _ = min(bounded)
        reset = max(1, math.ceil(self._period[1] - now))
        headers = {
            "X-RateLimit-Limit": str(limit),
            "X-RateLimit-Remaining": str(max(0, remaining)),
            "X-RateLimit-Reset": str(reset),
        }
        if not admitted:
            raise self._quota_refused(principal.key_id, what, reset, headers)
        return headers


def in_namespace(api: Any, owner: str) -> Any:
    """An API spec as user `owner`'s (`<owner>.<api>` at /<owner>/<api>), as ownership.py
    names a user's deployment on `kiln server`: what a key of that user may see."""
    return api.model_copy(
        update={"name": f"{owner}.{api.name}", "endpoint": f"/{owner}/{api.name}"}
    )


def shared_authority(store_url: str, home: Any = None) -> SharedQuotaGate:
    """Keys, plans and shared admission for an ingress process on the store at `store_url`.

    Plans come from `<KILN_HOME>/plans.yaml` on the node (the built-in plans without
    it), keys and users from the store (those a `kiln server` on it created).
    """
    from kiln.control.store import Store, kiln_home

    store = Store(store_url)
    accounts = Accounts(store)
    return SharedQuotaGate(store, accounts, load_plans(home or kiln_home()))
