"""Prometheus metrics: histograms on the hot path, gauges read at scrape time.

Counters and histograms are updated per request and per batch; gauges (queue
depth, in-flight, replicas by state, restarts) are computed from the registry
only when Prometheus scrapes, so they cost nothing per request. TorchServe's
documented metric names are kept beside Kiln's so existing TorchServe
dashboards keep working.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Summary,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kiln.control.tracker import PredictionMonitor

LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class _LiveState(Collector):
    """Gauges read from the running APIs when scraped."""

    def __init__(self, registry_of_apis: Any) -> None:
        self.apis = registry_of_apis

    def collect(self) -> Iterator[Any]:
        in_flight = GaugeMetricFamily(
            "kiln_in_flight_requests", "Requests queued or running", labels=["api", "version"]
        )
        queue = GaugeMetricFamily(
            "kiln_queue_depth", "Requests waiting for a replica", labels=["api", "version"]
        )
        replicas = GaugeMetricFamily(
            "kiln_replicas", "Replicas by state", labels=["api", "version", "state"]
        )
        restarts = CounterMetricFamily(
            "kiln_worker_restarts", "Worker processes restarted", labels=["api", "version"]
        )
        oom = CounterMetricFamily(
            "kiln_worker_oom_kills",
            "Workers killed for exceeding compute.mem",
            labels=["api", "version"],
        )
        for served in self.apis.all():
            labels = [served.name, served.version or ""]
            in_flight.add_metric(labels, served.in_flight_total())
            queue.add_metric(labels, len(served.queue))
            counts: dict[str, int] = {}
            for slot in served.slots:
                counts[slot.state] = counts.get(slot.state, 0) + 1
            for state in ("ready", "loading", "restarting", "failed"):
                replicas.add_metric([*labels, state], counts.get(state, 0))
            restarts.add_metric(labels, served.restarts)
            oom.add_metric(labels, sum(slot.oom_kills for slot in served.slots))
        yield from (in_flight, queue, replicas, restarts, oom)


class _KeyUsage(Collector):
    """Calls per API key (by key id, never the key), read from the quota gate when scraped."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Any]:
        family = CounterMetricFamily(
            "kiln_key_requests",
            "Metered calls per API key id and status class (since the server started)",
            labels=["key_id", "user", "status_class"],
        )
        for (key_id, user, status_class), count in list((self.metrics.key_totals or {}).items()):
            family.add_metric([key_id, user, status_class], count)
        yield family


def observe_many(child: Any, amounts: list[float]) -> None:
    """`child.observe(a)` for each amount, with one increment per bucket that moved.

    prometheus_client's `observe` scans the bounds in Python and takes two locks per
    amount; this counts per bucket first (its buckets are per-bucket counts, cumulated
    when collected). A histogram without those internals gets `observe` per amount.
    """
    buckets = getattr(child, "_buckets", None)
    bounds = getattr(child, "_upper_bounds", None)
    total = getattr(child, "_sum", None)
    if buckets is None or bounds is None or total is None or len(buckets) != len(bounds):
        for amount in amounts:
            child.observe(amount)
        return
    moved: dict[int, int] = {}
    for amount in amounts:
        index = bisect_left(bounds, amount)  # the first bound >= amount, as observe finds it
        if index < len(bounds):
            moved[index] = moved.get(index, 0) + 1
    total.inc(sum(amounts))
    for index, n in moved.items():
        buckets[index].inc(n)


class Metrics:
    """Kiln's metrics registry; one per server."""

    def __init__(self, apis: Any) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "kiln_requests",
            "Requests answered",
            ["api", "version", "protocol", "status_class"],
            registry=r,
        )
        self.latency = Histogram(
            "kiln_request_latency_seconds",
            "Time from request to response",
            ["api"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "kiln_queue_time_seconds",
            "Time a request waited for a replica",
            ["api"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_time = Histogram(
            "kiln_inference_time_seconds",
            "Time a batch spent in its worker",
            ["api"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "kiln_batch_size",
            "Requests per model call",
            ["api"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        # A client that left while its request was queued (dropped before any worker saw
        # it) or running (its answer is discarded). Exposed as kiln_requests_cancelled_total.
        self.cancellations = Counter(
            "kiln_requests_cancelled",
            "Requests whose client disconnected before the answer, by where they were",
            ["api", "where"],
            registry=r,
        )
        # Traffic shadowing: copies of requests sent to a shadow version, by its answer's
        # status code ("dropped": not sent, the shadow's queue or the copy limit was full).
        self.shadow_requests = Counter(
            "kiln_shadow_requests",
            "Requests mirrored to a shadow version, by the shadow's status (never returned)",
            ["api", "version", "status"],
            registry=r,
        )
        # TorchServe's names (docs/metrics.md of pytorch/serve), for existing dashboards.
        self.ts_requests = Counter(
            "ts_inference_requests",
            "Total inference requests (TorchServe name)",
            ["model_name", "model_version"],
            registry=r,
        )
        self.ts_latency = Counter(
            "ts_inference_latency_microseconds",
            "Cumulative inference latency (TorchServe name)",
            ["model_name", "model_version"],
            registry=r,
        )
        self.ts_queue = Counter(
            "ts_queue_latency_microseconds",
            "Cumulative queue latency (TorchServe name)",
            ["model_name", "model_version"],
            registry=r,
        )
        self.tracked_classes = Counter(
            "kiln_tracked_predictions",
            "Predictions per class (tracker: classification)",
            ["api", "version", "class_name"],
            registry=r,
        )
        # What TorchServe handlers record with context.metrics (handlers/torchserve_context.py).
        self.handler_counters = Counter(
            "kiln_handler_counter",
            "Counts a TorchServe handler added with context.metrics.add_counter",
            ["api", "version", "name"],
            registry=r,
        )
        self.handler_values = Gauge(
            "kiln_handler_metric",
            "Latest value a TorchServe handler recorded with context.metrics "
            "(add_time, add_size, add_percent, add_metric)",
            ["api", "version", "name", "unit"],
            registry=r,
        )
        self.tracked_values = Summary(
            "kiln_tracked_value",
            "Predicted values (tracker: regression)",
            ["api", "version"],
            registry=r,
        )
        # In memory by default; the server swaps in `DurableCounters` (which has the same
        # `record`/`summary`) so tracker counts and usage survive restarts.
        self.monitor: Any = PredictionMonitor()
        self.usage: Any = None  # DurableCounters, when the server has a state store
        self.series: Any = None  # TimeSeries (per-minute history), with a state store
        r.register(_LiveState(apis))
        self.key_totals: Any = None  # QuotaGate.key_totals, with API keys on
        r.register(_KeyUsage(self))
        # `labels()` validates and locks on every call; the hot path looks children up once.
        self._request_children: dict[tuple[str, str, str, int], tuple[Any, Any]] = {}
        self._batch_children: dict[tuple[str, str], tuple[Any, ...]] = {}

    def request(
        self, api: str, protocol: str, status: int, seconds: float, version: str = ""
    ) -> None:
        children = self._children((api, version, protocol, status))
        children[0].inc()
        children[1].observe(seconds)
        if self.usage is not None:
            self.usage.count_request(api, status)
        if self.series is not None:
            self.series.observe(api, status, seconds)

    def answered(self, answers: list[tuple[str, str, int, float, str]]) -> None:
        """Many answers (api, protocol, status, seconds, version) at once, as `request` each.

        protocols/bookkeeping.py hands over a loop turn's answers: one increment per
        counter and bucket that moved instead of one per answer (each takes a lock).
        """
        counted: dict[tuple[str, str, str, int], int] = {}
        latencies: dict[str, list[float]] = {}
        usage: dict[tuple[str, int], int] = {}
        for api, protocol, status, seconds, version in answers:
            key = (api, version, protocol, status)
            counted[key] = counted.get(key, 0) + 1
            latencies.setdefault(api, []).append(seconds)
            usage[(api, status)] = usage.get((api, status), 0) + 1
        for key, n in counted.items():
            counter, latency = self._children(key)
            counter.inc(n)
            amounts = latencies.pop(key[0], None)  # one latency child per API: observed once
            if amounts is not None:
                observe_many(latency, amounts)
        if self.usage is not None:
            self.usage.count_requests(usage)
        if self.series is not None:
            self.series.observe_many([(a[0], a[2], a[3]) for a in answers])

    def _children(self, key: tuple[str, str, str, int]) -> tuple[Any, Any]:
        """The (requests counter, latency histogram) children of one label set, looked up once."""
        children = self._request_children.get(key)
        if children is None:
            api, version, protocol, status = key
            children = (
                self.requests.labels(api, version, protocol, f"{status // 100}xx"),
                self.latency.labels(api),
            )
            self._request_children[key] = children
        return children

    def batch(self, served: Any, queue_times: list[float], inference_s: float, size: int) -> None:
        key = (served.name, served.version or "")
        children = self._batch_children.get(key)
        if children is None:
            name, version = key
            children = (
                self.batch_size.labels(name),
                self.inference_time.labels(name),
                self.queue_time.labels(name),
                self.ts_requests.labels(name, version),
                self.ts_latency.labels(name, version),
                self.ts_queue.labels(name, version),
            )
            self._batch_children[key] = children
        batch_size, inference, queue, ts_requests, ts_latency, ts_queue = children
        batch_size.observe(size)
        inference.observe(inference_s)
        observe_many(queue, queue_times)
        ts_requests.inc(size)
        ts_latency.inc(inference_s * 1e6 * size)
        ts_queue.inc(sum(queue_times) * 1e6)

    def shadow(self, api: str, version: str, status: str) -> None:
        """A shadow copy answered (or was dropped); serving/data_plane.py calls it."""
        self.shadow_requests.labels(api, version, status).inc()

    def cancelled(self, served: Any, where: str) -> None:
        """A request's client left; `where` is "queued" or "running" (served.py calls it)."""
        self.cancellations.labels(served.name, where).inc()

    def handler_metrics(self, served: Any, recorded: list[Any]) -> None:
        """`context.metrics` of a TorchServe handler, [name, kind, value, unit] each."""
        version = served.version or ""
        for name, kind, value, unit in recorded:
            if kind == "counter":
                self.handler_counters.labels(served.name, version, name).inc(max(0.0, value))
            else:
                self.handler_values.labels(served.name, version, name, unit).set(value)

    def tracked(self, served: Any, values: list[Any]) -> None:
        """Values the worker pulled out of answers for the API's `tracker:`."""
        version = served.version or ""
        model_type = served.api.tracker.model_type
        self.monitor.record(served.name, version, model_type, values)
        if model_type == "classification":
            for value in values:
                self.tracked_classes.labels(served.name, version, value).inc()
        else:
            summary = self.tracked_values.labels(served.name, version)
            for value in values:
                summary.observe(value)

    def latency_percentiles(self) -> dict[str, dict[str, float | None]]:
        """Per API: p50 and p99 request latency in seconds, as histogram upper bounds.

        Read from the same histogram Prometheus scrapes, so `kiln get` and a
        dashboard agree; the value is the bucket bound the percentile falls under.
        """
        points: dict[str, list[tuple[float, float]]] = {}
        for family in self.latency.collect():
            for sample in family.samples:
                if sample.name.endswith("_bucket"):
                    le = float(sample.labels["le"])
                    points.setdefault(sample.labels["api"], []).append((le, sample.value))
        out: dict[str, dict[str, float | None]] = {}
        for api, series in points.items():
            series.sort()
            total = series[-1][1] if series else 0
            out[api] = {
                f"p{q}": next((le for le, c in series if total and c >= total * q / 100), None)
                for q in (50, 99)
            }
        return out

    def render(self, viewer: Any = None) -> bytes:
        """The text exposition; for a `viewer` (a Principal) that does not see every API,
        only the series of APIs it sees and of its own user (no other tenant's names,
        API or key ids)."""
        if viewer is None or viewer.sees_all:
            return generate_latest(self.registry)
        return generate_latest(_Visible(self.registry, viewer))  # type: ignore[arg-type]


_NAME_LABELS = ("api", "model_name")


class _Visible:
    """Another registry's families, with only the samples `viewer` may see."""

    def __init__(self, registry: CollectorRegistry, viewer: Any) -> None:
        self.registry, self.viewer = registry, viewer

    def _keeps(self, labels: dict[str, str]) -> bool:
        if "user" in labels:
            return labels["user"] == self.viewer.user
        names = [labels[n] for n in _NAME_LABELS if n in labels]
        return bool(names) and all(self.viewer.sees(n) for n in names)

    def collect(self) -> Iterator[Any]:
        for family in self.registry.collect():
            kept = Metric(family.name, family.documentation, family.type, family.unit)
            kept.samples = [s for s in family.samples if self._keeps(s.labels)]
            yield kept


def metrics_app(metrics: Metrics) -> Any:
    """The metrics port: `GET /metrics` in Prometheus' text format.

    With API keys on, the server wraps this app in `ManagementGate`: a scrape needs a
    `manage` key (Prometheus: `authorization: {credentials: <key>}`, sent as a bearer
    token), and a user's key reads only its own series (`Metrics.render`).
    """

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] not in ("/metrics", "/"):
            body, status, ctype = b"not found: scrape /metrics\n", 404, b"text/plain"
        else:
            viewer = scope.get("state", {}).get("principal")
            body, status, ctype = metrics.render(viewer), 200, b"text/plain; version=0.0.4"
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", ctype), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})

    return app
