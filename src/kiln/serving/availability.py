"""API state -> 503: the one mapping from an API version's state to the error a caller gets.

The queue, `wait_ready`, the dispatcher and the replica pool all refuse or fail
requests when an API cannot answer; each used to spell its own message and
`Retry-After`. They agree here, so a client sees the same answer for the same
state whichever path found it.
"""

from __future__ import annotations

from typing import Any

from kiln.errors import Unavailable

# States in which a request may wait (the API is coming up or back): no error yet.
WAITABLE = frozenset({"ready", "loading", "restarting", "scaled to zero"})


def unavailable(
    served: Any, state: str | None = None, *, noun: str = "API", load_hint: str = "load it first"
) -> Unavailable | None:
    """The 503 for `served` in `state` (default: its current one), or None if it can answer
    now or soon (ready, loading, restarting, scaled to zero: the caller waits instead).

    `noun` and `load_hint` let a protocol speak its own words (V2 says "model" and names
    its repository load route) while the states and Retry-After stay the same everywhere.
    """
    state = served.state if state is None else state
    if state in WAITABLE:
        return None
    what = f"{noun} '{served.name}'"
    if state == "failed":
        return Unavailable(
            f"{what} failed to load: {served.error}",
            retry_after=5,
            load_error_of=served.name,
        )
    if state == "compute unavailable":
        return Unavailable(
            f"{what} has no replica: compute unavailable ({served.compute_unavailable})",
            retry_after=30,
        )
    if state == "unloaded":
        return Unavailable(f"{what} is unloaded; {load_hint}", retry_after=5)
    if state == "stopped":
        return Unavailable(f"{what} is shutting down; retry shortly", retry_after=5)
    return Unavailable(f"{what} is {state}; retry shortly", retry_after=5)


def not_ready_in_time(served: Any) -> Unavailable:
    """Still loading or restarting when the caller's wait ran out."""
    return Unavailable(f"API '{served.name}' is still {served.state}; retry shortly", retry_after=1)
