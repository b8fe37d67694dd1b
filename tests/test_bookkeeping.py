"""Answers recorded together (protocols/bookkeeping.py) record exactly what one at a time did.

The bulk paths (`Metrics.answered`, `observe_many`, `DurableCounters.count_requests`,
`TimeSeries.observe_many`, `LogSink.write_many`) are compared with the one-answer
paths on the same answers; `Bookkeeping` records at the next loop turn, in order,
falls back to one at a time for a log or metrics object without the bulk method
(the Ray forwarders), and a recorder that fails loses nothing else.
"""

from __future__ import annotations

import asyncio
import io
from pathlib import Path
from typing import Any

import orjson
from prometheus_client import CollectorRegistry, Histogram

from kiln.control.durable import DurableCounters
from kiln.control.logs import LogSink
from kiln.control.metrics import LATENCY_BUCKETS, Metrics, observe_many
from kiln.control.store import Store
from kiln.control.timeseries import TimeSeries
from kiln.protocols.bookkeeping import Bookkeeping

# On a bound, between bounds, past the last finite bound, zero: every bucket rule.
AMOUNTS = [0.0, 0.0005, 0.001, 0.0012, 0.004, 0.25, 0.25000001, 7.0, 1e9, 0.001]
ANSWERS = [
    ("mlp", "native", 200, 0.0012, ""),
    ("mlp", "v2", 200, 0.004, ""),
    ("mlp", "native", 503, 0.25, ""),
    ("tiny", "v1", 404, 0.0005, "2"),
    ("mlp", "native", 200, 1e9, ""),
    ("tiny", "v1", 200, 0.001, "2"),
    ("mlp", "native", 429, 0.0, ""),
]


class NoApis:
    groups: dict[str, Any] = {}

    def all(self) -> list[Any]:
        return []


def samples(registry: Any) -> list[tuple[str, tuple[tuple[str, str], ...], float]]:
    """Every sample but the `_created` timestamps (they differ between two objects)."""
    return sorted(
        (s.name, tuple(sorted(s.labels.items())), s.value)
        for family in registry.collect()
        for s in family.samples
        if not s.name.endswith("_created")
    )


def test_observe_many_moves_the_same_buckets_and_sum_as_observe() -> None:
    one, many = CollectorRegistry(), CollectorRegistry()
    a = Histogram("h", "h", ["api"], buckets=LATENCY_BUCKETS, registry=one).labels("x")
    b = Histogram("h", "h", ["api"], buckets=LATENCY_BUCKETS, registry=many).labels("x")
    for amount in AMOUNTS:
        a.observe(amount)
    observe_many(b, AMOUNTS)
    assert samples(one) == samples(many)
    assert ("h_count", (("api", "x"),), float(len(AMOUNTS))) in samples(many)


def make_metrics(tmp_path: Path, name: str) -> Metrics:
    metrics = Metrics(NoApis())
    store = Store(f"sqlite:///{tmp_path / name}.db")
    metrics.usage = DurableCounters(store)
    metrics.series = TimeSeries(store, NoApis(), LATENCY_BUCKETS, clock=lambda: 1_800_000_000.0)
    return metrics


def test_answered_records_what_request_records_one_at_a_time(tmp_path: Path) -> None:
    one = make_metrics(tmp_path, "one")
    many = make_metrics(tmp_path, "many")
    for api, protocol, status, seconds, version in ANSWERS:
        one.request(api, protocol, status, seconds, version)
    many.answered(ANSWERS)
    assert samples(one.registry) == samples(many.registry)
    assert (
        dict(one.usage._usage)
        == dict(many.usage._usage)
        == {
            ("mlp", "2xx"): 3,
            ("mlp", "5xx"): 1,
            ("mlp", "4xx"): 1,
            ("tiny", "4xx"): 1,
            ("tiny", "2xx"): 1,
        }
    )
    assert one.series._counts == many.series._counts and many.series._counts


def test_write_many_writes_the_lines_write_does(tmp_path: Path) -> None:
    records = [
        ("mlp", {"event": "request", "path": "/mlp", "status": 200, "n": 1}),
        ("tiny", {"event": "request", "path": '/ti"ny', "status": 404, "n": 2}),
        ("mlp", {"event": "request", "path": "/mlp", "status": 503, "n": 3}),
    ]
    echoed = {"one": io.StringIO(), "many": io.StringIO()}
    sinks = {name: LogSink(tmp_path / name, stream=echoed[name]) for name in ("one", "many")}
    for api, record in records:
        sinks["one"].write(api, record)
    sinks["many"].write_many(records)
    for sink in sinks.values():
        sink.flush()
        sink.close()

    def lines(text: str) -> list[dict[str, Any]]:
        parsed = [orjson.loads(line) for line in text.splitlines()]
        for item in parsed:
            assert isinstance(item.pop("ts"), float)
        return parsed

    for api in ("mlp", "tiny"):
        one = lines((tmp_path / "one" / f"{api}.log").read_text())
        many = lines((tmp_path / "many" / f"{api}.log").read_text())
        assert one == many and [r["n"] for r in many] == [r["n"] for a, r in records if a == api]
    assert [r["n"] for r in lines(echoed["many"].getvalue())] == [1, 2, 3]
    assert lines(echoed["one"].getvalue()) == lines(echoed["many"].getvalue())


class OneAtATime:
    """A metrics object and a log with only the one-answer methods (as the Ray forwarders)."""

    def __init__(self) -> None:
        self.seen: list[tuple[Any, ...]] = []

    def request(self, *answer: Any) -> None:
        self.seen.append(("metrics", *answer))

    def write(self, api: str, record: dict[str, Any]) -> None:
        if record.get("boom"):
            raise OSError("disk full")
        self.seen.append(("log", api, record["n"]))


def test_bookkeeping_records_at_the_next_turn_in_order_and_survives_a_failure() -> None:
    async def scenario() -> None:
        both = OneAtATime()
        books = Bookkeeping(both, both, "kiln")
        books.answered("mlp", "native", 200, 0.001, "", {"n": 1})
        books.answered("kiln", "native", 404, 0.002, "", {"n": 2})  # logged, never metered
        books.answered("mlp", "v2", 500, 0.003, "", {"n": 3, "boom": True})
        books.answered("mlp", "v2", 200, 0.004, "", None)  # metered, not logged
        books.answered("mlp", "v1", 200, 0.005, "", {"n": 5})
        assert both.seen == []  # nothing yet: at the next loop turn
        await asyncio.sleep(0)
        assert both.seen == [
            ("metrics", "mlp", "native", 200, 0.001, ""),
            ("log", "mlp", 1),
            ("log", "kiln", 2),
            ("metrics", "mlp", "v2", 500, 0.003, ""),
            ("metrics", "mlp", "v2", 200, 0.004, ""),
            ("metrics", "mlp", "v1", 200, 0.005, ""),
            ("log", "mlp", 5),
        ]
        books.answered("mlp", "native", 200, 0.006, "", {"n": 6})  # a later turn: again
        await asyncio.sleep(0)
        assert both.seen[-1] == ("log", "mlp", 6)

    asyncio.run(scenario())


def test_bookkeeping_hands_a_turn_to_the_bulk_methods_once(tmp_path: Path) -> None:
    async def scenario() -> None:
        metrics = make_metrics(tmp_path, "bulk")
        sink = LogSink(tmp_path / "logs", stream=io.StringIO())
        books = Bookkeeping(metrics, sink, "kiln")
        for api, protocol, status, seconds, version in ANSWERS:
            books.answered(api, protocol, status, seconds, version, {"status": status})
        await asyncio.sleep(0)
        reference = make_metrics(tmp_path, "reference")
        reference.answered(ANSWERS)
        assert samples(metrics.registry) == samples(reference.registry)
        sink.flush()
        logged = (tmp_path / "logs" / "mlp.log").read_text().splitlines()
        assert [orjson.loads(x)["status"] for x in logged] == [200, 200, 503, 200, 429]

    asyncio.run(scenario())
