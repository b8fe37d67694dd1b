"""Prometheus metrics on their own port, parsed with prometheus_client's parser."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import orjson
from prometheus_client.parser import text_string_to_metric_families
from support import KilnServer, build_linear_onnx, write


def scrape(server: KilnServer) -> dict[tuple[str, tuple], float]:
    text = httpx.get(server.metrics_url, timeout=10).text
    samples: dict[tuple[str, tuple], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_counts_histograms_and_torchserve_names_match_the_requests_sent(tmp_path: Path) -> None:
    build_linear_onnx(tmp_path / "m.onnx", np.eye(4, 2, dtype=np.float32))
    write(
        tmp_path / "kiln.yaml",
        "- kind: api\n  name: lin\n  onnx: {model: m.onnx}\n"
        "  batching: {max_batch_size: 8, max_batch_delay_ms: 5}\n",
    )
    server = KilnServer(tmp_path, tmp_path / "home")
    try:
        with ThreadPoolExecutor(8) as pool:
            good = list(
                pool.map(lambda i: server.client.post("/lin", json=[i, 0, 0, 0]), range(40))
            )
        bad = [server.client.post("/lin", json=[1, 2]) for _ in range(3)]
        assert all(r.status_code == 200 for r in good) and all(r.status_code == 400 for r in bad)

        samples = scrape(server)
        ok = value(
            samples,
            "kiln_requests_total",
            api="lin",
            version="",
            protocol="native",
            status_class="2xx",
        )
        client_errors = value(
            samples,
            "kiln_requests_total",
            api="lin",
            version="",
            protocol="native",
            status_class="4xx",
        )
        assert (ok, client_errors) == (40, 3)
        assert value(samples, "kiln_request_latency_seconds_count", api="lin") == 43
        batches = value(samples, "kiln_batch_size_count", api="lin")
        rows = value(samples, "kiln_batch_size_sum", api="lin")
        assert rows == 43, "every request went through a model call exactly once"
        assert batches <= 43
        assert value(samples, "kiln_queue_time_seconds_count", api="lin") == 43
        assert (
            value(samples, "ts_inference_requests_total", model_name="lin", model_version="") == 43
        )
        assert (
            value(
                samples, "ts_queue_latency_microseconds_total", model_name="lin", model_version=""
            )
            > 0
        )
        assert value(samples, "kiln_replicas", api="lin", version="", state="ready") == 1
        assert value(samples, "kiln_queue_depth", api="lin", version="") == 0
        assert httpx.get(server.metrics_url.replace("/metrics", "/nope")).status_code == 404
    finally:
        server.stop()


def test_the_grafana_dashboard_uses_only_metrics_kiln_exports() -> None:
    import re

    from kiln.control.metrics import Metrics
    from kiln.serving.router import Registry

    dashboard = orjson.loads(
        (Path(__file__).parent.parent / "docs/grafana-dashboard.json").read_bytes()
    )
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = {
        re.sub(r"_(bucket|sum|count|total)$", "", m)
        for e in exprs
        for m in re.findall(r"\b(?:kiln|ts)_\w+", e)
    }
    exported = {
        line.split()[2]
        for line in Metrics(Registry()).render().decode().splitlines()
        if line.startswith("# HELP")
    }
    assert used and used <= {re.sub(r"_total$", "", name) for name in exported}, used - exported
