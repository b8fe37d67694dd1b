"""What `kiln get` shows: each API's status, replicas, traffic and latency, and one in detail.

Statuses follow Cortex's words, which its users already read: `live`,
`updating`, `error`, `error (out of memory)`, `compute unavailable`, plus
`scaled to zero`. Request counts come from the durable usage counters (so they
survive restarts); latency percentiles from the Prometheus histogram the
metrics port exposes, so `kiln get` and a dashboard agree.
"""

from __future__ import annotations

import os
import time
from typing import Any

from kiln.control.packaging import short_revision
from kiln.errors import NotFound

OOM_MARK = "compute.mem"


def server_info(server: Any, viewer: Any = None) -> dict[str, Any]:
    """`GET /server`. Paths of the server's machine (`home`) are for the admin only:
    `viewer` is the caller's Principal (None: auth off, the developer's own server)."""
    import kiln

    running = server.running
    info = {
        "version": kiln.__version__,
        "mode": server.options.mode,
        "backend": server.backend.name,
        "pid": os.getpid(),
        "started": server.started,
        "uptime_s": round(time.time() - server.started, 1),
        "home": str(server.options.home),
        "url": running.url if running else None,
        "management_url": running.management_url if running else None,
        "metrics_url": running.metrics_url if running else None,
        "apis": len(server.registry.view(viewer).all()),
        "deployments": len({d for d in server.deployments.owner.values()}),
    }
    if viewer is not None and not viewer.is_admin:
        del info["home"]
    return info


def api_status(server: Any, served: Any) -> str:
    manager = server.deployments
    unavailable = getattr(served, "compute_unavailable", None)
    if unavailable:
        return "compute unavailable"
    deployment = manager.owner.get(served.name)
    rollout = manager.rollouts.get(deployment) if deployment else None
    if rollout is not None and rollout.status == "updating" and served.name in rollout.apis:
        return "updating"
    state = served.state
    placed = getattr(served, "placement", None)
    if state == "ready" and placed == [] and served.api.compute.min_replicas == 0:
        return "scaled to zero"  # the backend (Serve) scaled it down: no replica runs
    if state == "ready":
        return "live"
    if state == "scaled to zero":
        return "scaled to zero"
    if state == "loading":
        return "updating"
    if state in ("failed", "restarting"):
        errors = [slot.error or "" for slot in served.slots]
        if any(OOM_MARK in e for e in errors) or any(s.oom_kills for s in served.slots):
            return "error (out of memory)"
        return "error" if state == "failed" or served.restarts else "updating"
    return state


def _entry(server: Any, served: Any, latency: dict[str, Any]) -> dict[str, Any]:
    manager = server.deployments
    running = server.running
    base = running.url if running else ""
    low, high = served.replica_bounds
    compute = served.api.compute
    lat = latency.get(served.name, {})
    entry: dict[str, Any] = {
        "name": served.name,
        "version": served.version,
        "deployment": manager.owner.get(served.name),
        "revision": short_revision(served.revision) if served.revision else None,
        "status": api_status(server, served),
        "replicas": {
            "ready": len(served.ready_slots()),
            "requested": len(served.slots),
            "min": low,
            "max": high,
            "configured_max": compute.max_replicas,
            "restarts": served.restarts,
        },
        "requests": {"2xx": 0, "4xx": 0, "5xx": 0},
        "latency_ms": {
            q: (None if v is None else (v * 1000 if v != float("inf") else "slower"))
            for q, v in (("p50", lat.get("p50")), ("p99", lat.get("p99")))
        },
        "last_update": _last_update(manager, served),
        "url": f"{base}{served.api.endpoint}",
        "endpoint": served.api.endpoint,
        "runtime": served.api.runtime,
    }
    if high < compute.max_replicas:
        entry["replicas"]["capped"] = (
            f"max_replicas {compute.max_replicas} capped at {high}: the replicas' CPU and "
            f"memory requests must fit this machine"
        )
    placed = getattr(served, "placement", None)
    if placed is not None:  # a backend placed it (Ray): its replicas and their nodes
        entry["replicas"]["ready"] = sum(1 for r in placed if r["state"] == "running")
        entry["replicas"]["requested"] = len(placed)
        entry["replicas"]["on_nodes"] = placed
        entry["replicas"].pop("capped", None)  # this machine's size does not bound it
    if server.counters is not None:
        entry["requests"].update(server.counters.usage_totals(served.name))
    error = served.error or getattr(served, "compute_unavailable", None)
    if error:
        entry["error"] = error
    return entry


def _last_update(manager: Any, served: Any) -> float | None:
    deployment = manager.owner.get(served.name)
    rollout = manager.rollouts.get(deployment) if deployment else None
    if rollout is not None:
        return rollout.finished or rollout.started
    if deployment:
        dep = manager.store.get_deployment(deployment)
        return dep.updated_at if dep else None
    return None


def list_apis(server: Any, viewer: Any = None) -> list[dict[str, Any]]:
    """Every API `viewer` may see (the caller's Principal; None: auth off, all of them)."""
    latency = server.metrics.latency_percentiles()
    shown = server.registry.view(viewer).all()
    realtime = [_entry(server, served, latency) for served in shown]
    batch = [_batch_entry(server, name) for name in _visible_batch_apis(server, viewer)]
    return realtime + batch + [_failed_entry(server, n) for n in _failed_first(server, viewer)]


def _failed_first(server: Any, viewer: Any) -> list[str]:
    """APIs whose first deploy failed (nothing serves the name): shown as `error`."""
    failed = getattr(server.deployments, "failed_first", {})
    served = server.registry.groups
    jobs = server.jobs.apis if server.jobs is not None else {}
    return [
        n
        for n in sorted(failed)
        if n not in served and n not in jobs and (viewer is None or viewer.sees(n))
    ]


def _failed_entry(server: Any, name: str) -> dict[str, Any]:
    """An API whose first deploy failed: its reason, no replicas, the URL it will have."""
    failed = server.deployments.failed_first[name]
    api = failed["api"]
    base = server.running.url if server.running else ""
    entry: dict[str, Any] = {
        "name": name,
        "version": getattr(api, "version", None),
        "deployment": failed["deployment"],
        "revision": short_revision(failed["revision"]),
        "status": "error",
        "replicas": {"ready": 0, "requested": 0, "min": 0, "max": 0, "restarts": 0},
        "requests": server.counters.usage_totals(name) if server.counters else {},
        "latency_ms": {"p50": None, "p99": None},
        "last_update": failed["time"],
        "url": f"{base}{api.endpoint}",
        "endpoint": api.endpoint,
        "runtime": api.runtime,
        "error": failed["error"],
    }
    if api.runtime == "predictor" or not hasattr(api, "serving"):
        entry["kind"] = "BatchAPI"
    return entry


def _visible_batch_apis(server: Any, viewer: Any) -> list[str]:
    jobs = server.jobs
    if jobs is None:
        return []
    return [n for n in sorted(jobs.apis) if viewer is None or viewer.sees(n)]


def _batch_entry(server: Any, name: str) -> dict[str, Any]:
    """A Batch API in `kiln get`: it has no replicas of its own (workers run per job)."""
    entry = server.jobs.apis[name]
    running = [r for r in list(server.jobs.runs.values()) if r.job.api == name]
    base = server.running.url if server.running else ""
    return {
        "name": name,
        "version": None,
        "kind": "BatchAPI",
        "deployment": server.deployments.owner.get(name),
        "revision": short_revision(entry.revision) if entry.revision else None,
        "status": "live",
        "replicas": {"ready": 0, "requested": 0, "min": 0, "max": 0, "restarts": 0},
        "jobs_running": len(running),
        "requests": server.counters.usage_totals(name) if server.counters else {},
        "latency_ms": {"p50": None, "p99": None},
        "last_update": _last_update(server.deployments, entry.spec),
        "url": f"{base}{entry.spec.endpoint}",
        "endpoint": entry.spec.endpoint,
        "runtime": entry.spec.runtime,
    }


def api_detail(server: Any, name: str, window_s: float, viewer: Any = None) -> dict[str, Any]:
    """One API: its list entry per version, plus tracker, errors, events and a curl line.

    An API `viewer` may not see answers like a missing one."""
    group = server.registry.view(viewer).groups.get(name)
    manager = server.deployments
    if group is None and name in _visible_batch_apis(server, viewer):
        batch: dict[str, Any] = {**_batch_entry(server, name), "versions": []}
        batch["recent_errors"] = list(manager.errors.get(name, ()))
        batch["scaling_events"] = []
        batch["curl"] = (
            f"curl -X POST '{batch['url']}' -H 'Content-Type: application/json' -d @job.json"
        )
        return batch
    if group is None and name in _failed_first(server, viewer):
        failed: dict[str, Any] = {**_failed_entry(server, name), "versions": []}
        failed["recent_errors"] = list(manager.errors.get(name, ()))[-10:]
        failed["scaling_events"] = []
        failed["revisions"] = manager.status_of(failed["deployment"])["revisions"]
        return failed
    if group is None:
        raise NotFound(f"no API named '{name}'; `kiln get` lists the APIs")
    latency = server.metrics.latency_percentiles()
    versions = [_entry(server, served, latency) for served in group.versions.values()]
    default = group.default
    detail: dict[str, Any] = {**_entry(server, default, latency), "versions": versions}
    if default.api.tracker is not None and server.counters is not None:
        detail["tracker"] = server.counters.summary(name, default.version or "", window_s)
        if default.tracker_warning:
            detail["tracker"]["warning"] = default.tracker_warning
    errors = list(manager.errors.get(name, ()))
    for served in group.versions.values():
        for slot in served.slots:
            if slot.error:
                errors.append({"time": None, "error": f"replica {slot.index}: {slot.error}"})
    detail["recent_errors"] = errors[-10:]
    events = [dict(e) for e in list(default.scaling_events)]
    if not events and manager.owner.get(name):
        stored = manager.store.scaling_events(name, limit=20)
        events = [
            {"time": e.at, "from": e.from_replicas, "to": e.to_replicas, "reason": e.reason}
            for e in reversed(stored)
        ]
    detail["scaling_events"] = events
    sample = "@sample.json"
    detail["curl"] = (
        f"curl -X POST '{detail['url']}?debug=true' -H 'Content-Type: application/json' -d {sample}"
    )
    deployment = manager.owner.get(name)
    if deployment:
        detail["revisions"] = manager.status_of(deployment)["revisions"]
    return detail
