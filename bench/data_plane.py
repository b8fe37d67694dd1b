"""Kiln's data plane against the limits of the same machine, measured in the same run.

  (a) in-process    onnxruntime `session.run` alone (1 thread), tiny and mlp, batch 1/8/32/64
  (b) bare app      bench/bare_app.py: /fixed (HTTP stack alone), /tiny and /mlp (the model run
                    inline in the request handler): what a hand-written server gets
  (c) kiln tiny     `kiln serve` of tiny.onnx, (d) kiln mlp: the same for mlp.onnx, each with
                    batching off/on x 1/2 replicas, on the native route, the KServe V1 route
                    and the V2 (Open Inference Protocol) route

Load: bench/loadgen.c, closed loop, C keep-alive connections, per-request latency.
Writes bench/results/data_plane-<timestamp>.json.

With --sandbox-compare every Kiln row is measured twice in the same run: `kiln serve` and
`kiln serve --sandbox` (bubblewrap namespaces, a dedicated uid when root, see
docs/architecture.md "Where user code runs") are both up for the configuration, and each
(route, concurrency) is loaded on one then the other, in alternating order, so drift on a
shared box falls on both. The report adds a table of sandboxed/plain ratios and flags any
c=64 row whose req/s is below 0.95x plain (the issue's bound: the sandbox must not cost the
hot path more than 5% at c=64), with every pair at c=64 pooled (geometric mean, 95% CI),
since one pair on a shared box varies far more than 5%. Every Kiln row also records the CPU
time its server and worker processes used per request. Cgroup limits apply to both when the
server is root; the sandbox adds bubblewrap, setpriv and the namespaces.

With --tracing on every `kiln serve` exports OpenTelemetry traces (serving/tracing.py: one
trace of 8 spans per request) over OTLP/HTTP to a no-op collector in this process, which
answers every export at once; its span count is in the report's notes. Off (the default),
nothing is exported. Compare two runs to see what tracing costs.

Run: .venv/bin/python bench/data_plane.py [--duration 5] [--concurrency 1,8,64] [--quick]
     [--models tiny,mlp] [--configs b0-r1,b1-r1] [--routes native,v1,v2] [--no-baselines]
     [--sandbox-compare] [--tracing off|on] [--trace-sample 0.1] [--busy-poll-us 0]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from datetime import datetime
from pathlib import Path

import numpy as np
import orjson

HERE = Path(__file__).parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import loadgen  # noqa: E402
import models  # noqa: E402

MODELS = ("tiny", "mlp")
BATCH_SIZES = (1, 8, 32, 64)
# (name, batching block or None, replicas)
# The reference harness of issue 13: batches of up to 64 rows, 2 ms, one intra-op thread.
BATCHING = {"max_batch_size": 64, "max_batch_delay_ms": 2}
CONFIGS = [
    ("b0-r1", None, 1),
    ("b1-r1", BATCHING, 1),
    ("b0-r2", None, 2),
    ("b1-r2", BATCHING, 2),
]
NA_V2 = "n/a (not served yet)"
# Targets (see bench/README.md)
ROUTES = ("native", "v1", "v2")
# Issue 13's targets, on every route:
TINY_VS_BARE = 1.4  # at c=64 with batching: tiny req/s >= 1.4x bare /tiny
MLP_VS_BARE = 2.5  # at c=64 with batching: mlp req/s >= 2.5x bare /mlp, p99 <= bare p99
P50_DELTA_MS = 0.15  # at c=1: Kiln p50 within 0.15 ms of the bare app's for the same model
SANDBOX_MIN_RATIO = 0.95  # at c=64: sandboxed req/s >= 0.95x plain `kiln serve`
SANDBOX_TAG = " sbx"  # suffix of a sandboxed row's scenario


# ----------------------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def post(url: str, body: bytes, timeout: float = 5.0) -> tuple[int, bytes]:
    request = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def get_json(url: str, timeout: float = 2.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as answer:
        return json.loads(answer.read())


def machine_info() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {
        "cpu_model": cpu,
        "cores": os.cpu_count(),
        "cores_usable": usable,
        "memory_gib": mem_gib,
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def versions() -> dict:
    import onnxruntime

    out = {"onnxruntime": onnxruntime.__version__, "numpy": np.__version__}
    try:
        import uvicorn

        out["uvicorn"] = uvicorn.__version__
    except ImportError:
        pass
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "src"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        out["kiln_git"] = rev + ("+dirty-src" if dirty else "")
    except OSError:
        pass
    return out


class Server:
    """A server process in its own session, stopped with SIGTERM (SIGKILL after a grace)."""

    def __init__(self, argv: list[str], log: Path, env: dict | None = None) -> None:
        self.log_path = log
        self._log = open(log, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            argv, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        self._log.flush()
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def stop(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        try:  # workers it started and left behind, in its own process group only
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self._log.close()


# ----------------------------------------------------------------------------- (a) in-process


def in_process(model_paths: dict[str, Path], seconds: float, names=MODELS) -> list[dict]:
    rows = []
    for name in names:
        sess = models.session(model_paths[name])
        for bs in BATCH_SIZES:
            x = models.sample_input(name, bs)
            for _ in range(20):
                sess.run(None, {"x": x})
            calls = 0
            started = time.perf_counter()
            deadline = started + seconds
            while True:
                for _ in range(10):
                    sess.run(None, {"x": x})
                calls += 10
                if time.perf_counter() >= deadline:
                    break
            elapsed = time.perf_counter() - started
            us = elapsed / calls * 1e6
            rows.append(
                {
                    "model": name,
                    "batch": bs,
                    "calls": calls,
                    "us_per_call": round(us, 2),
                    "rows_per_s": round(bs * calls / elapsed, 1),
                }
            )
    return rows


# ----------------------------------------------------------------------------- (b) bare app


def run_bare(folder: Path, bodies: dict, args, rows: list[dict]) -> None:
    port = free_port()
    server = Server(
        [sys.executable, str(HERE / "bare_app.py"), str(port), str(folder)], folder / "bare.log"
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if not server.alive():
                raise RuntimeError(f"bare app exited:\n{server.log_tail()}")
            try:
                if post(f"{base}/fixed", b"[]", timeout=1)[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"bare app did not come up:\n{server.log_tail()}")
            time.sleep(0.1)
        routes = [("/fixed", bodies["tiny"])] + [(f"/{n}", bodies[n]) for n in args.models]
        for path, body in routes:
            for c in args.concurrency:
                result = loadgen.run_load(base + path, body, c, args.duration, args.warmup)
                rows.append(
                    {"scenario": f"bare {path}", "model": path[1:], "config": "bare"}
                    | {"route": path, "concurrency": c}
                    | result
                )
                progress(rows[-1])
    finally:
        server.stop()


# ----------------------------------------------------------------------------- (c)/(d) kiln


def kiln_yaml(name: str, batching: dict | None, replicas: int) -> str:
    text = f"- kind: api\n  name: {name}\n  onnx:\n    model: {name}.onnx\n"
    if batching:
        text += (
            f"  batching: {{max_batch_size: {batching['max_batch_size']}, "
            f"max_batch_delay_ms: {batching['max_batch_delay_ms']}}}\n"
        )
    text += f"  compute: {{min_replicas: {replicas}, cpu: 1}}\n"
    return text


def wait_ready(server: Server, base: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if not server.alive():
            raise RuntimeError(f"kiln exited ({server.proc.returncode}):\n{server.log_tail()}")
        try:
            apis = get_json(f"{base}/apis")["apis"]
            states = [a.get("status") for a in apis]
            if apis and all(s == "ready" for s in states):
                return
            bad = [a for a in apis if a.get("status") in ("failed", "error", "stopped")]
            if bad:
                raise RuntimeError(f"kiln API not ready: {bad}\n{server.log_tail()}")
        except (OSError, ValueError, KeyError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"kiln did not become ready in {timeout:.0f}s:\n{server.log_tail()}")
        time.sleep(0.1)


def same_answer(got: bytes, expected: bytes) -> bool:
    try:
        a = np.asarray(orjson.loads(got), dtype=np.float64)
        b = np.asarray(orjson.loads(expected), dtype=np.float64)
        return a.shape == b.shape and bool(np.allclose(a, b, rtol=1e-4, atol=1e-5))
    except (ValueError, TypeError):
        return False


def v1_output(got: bytes) -> bytes:
    """The first prediction of a V1 answer, as a JSON list, to compare with the bare one."""
    try:
        return orjson.dumps(orjson.loads(got)["predictions"][0])
    except (ValueError, KeyError, IndexError, TypeError):
        return b"null"


def v2_output(got: bytes) -> bytes:
    """The data of a V2 answer's first output, as a JSON list, to compare with the bare one."""
    try:
        return orjson.dumps(orjson.loads(got)["outputs"][0]["data"])
    except (ValueError, KeyError, IndexError, TypeError):
        return b"null"


class NoopCollector:
    """An OTLP/HTTP endpoint that accepts every export and keeps only counts (--tracing on).

    Spans are counted from the protobuf when opentelemetry-proto is installed (the otel
    extra), else only exports and bytes are."""

    def __init__(self) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        counts = self.counts = {"exports": 0, "bytes": 0, "spans": 0}
        try:
            from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
                ExportTraceServiceRequest,
            )
        except ImportError:
            ExportTraceServiceRequest = None  # noqa: N806

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                counts["exports"] += 1
                counts["bytes"] += len(body)
                if ExportTraceServiceRequest is not None:
                    request = ExportTraceServiceRequest()
                    request.ParseFromString(body)
                    counts["spans"] += sum(
                        len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans
                    )
                self.send_response(200)
                self.send_header("content-type", "application/x-protobuf")
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


COLLECTOR: NoopCollector | None = None  # set by main() with --tracing on


def _poll_limit(value: int | None) -> str:
    return "Kiln's default" if value is None else f"{value} us"


def start_kiln(project: Path, args, sandbox: bool) -> tuple[Server, str]:
    """`kiln serve` of `project` (with --sandbox when asked); the server and its base URL."""
    port = free_port()
    tag = "sbx" if sandbox else "plain"
    env = {**os.environ, "KILN_HOME": str(project / f"home-{tag}")}
    if args.http:  # the inference port's HTTP layer (kiln or uvicorn's httptools)
        env["KILN_HTTP"] = args.http
    for name in [n for n in env if n.startswith("OTEL_")]:
        del env[name]  # tracing is what --tracing says, not the caller's environment
    if COLLECTOR is not None:
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = COLLECTOR.url
        env["OTEL_EXPORTER_OTLP_PROTOCOL"] = "http/protobuf"
        if args.trace_sample < 1.0:  # the SDK's own sampler: a share of the requests
            env["OTEL_TRACES_SAMPLER"] = "parentbased_traceidratio"
            env["OTEL_TRACES_SAMPLER_ARG"] = str(args.trace_sample)
    server = Server(
        [sys.executable, "-m", "kiln.cli.main", "serve", str(project)]
        + ["--port", str(port), "--management-port", "0", "--metrics-port", "0"]
        + ["--grpc-port", "0"]
        + ["--home", str(project / f"state-{tag}")]
        + (["--sandbox"] if sandbox else [])
        + ([] if args.busy_poll_us is None else ["--busy-poll-us", str(args.busy_poll_us)]),
        project / f"serve-{tag}.log",
        env,
    )
    return server, f"http://127.0.0.1:{port}"


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) used so far by a process and its live descendants."""
    total, todo, seen = 0.0, [pid], set()
    tick = os.sysconf("SC_CLK_TCK")
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            for task in Path(f"/proc/{current}/task").iterdir():
                todo.extend(int(c) for c in (task / "children").read_text().split())
        except (OSError, ValueError, IndexError):
            continue
    return total


def sandbox_line(server: Server) -> str | None:
    """The server's own line saying what protects its workers (printed when sandboxed)."""
    for line in server.log_path.read_text(errors="replace").splitlines():
        if line.startswith("sandbox:"):
            return line.strip()
    return None


def check_routes(name: str, base: str, bodies, typed_bodies, expected, scenario, notes) -> tuple:
    """([(route, path, body)] this server answers, native first, V1 and V2 when served; V2
    status). `typed_bodies` maps a model to its (V1 body, V2 body)."""
    status, answer = post(f"{base}/{name}", bodies[name])
    if status != 200:
        raise RuntimeError(f"POST /{name} answered {status}: {answer[:300]!r}")
    if not same_answer(answer, expected[name]):
        notes.append(f"{scenario}: native answer differs from the bare app's")
    routes = [("native", f"/{name}", bodies[name])]
    v1_body, v2_body = typed_bodies[name]
    v2_status = 0
    typed = (
        ("v1", f"/v1/models/{name}:predict", v1_body, v1_output, "V1 answer's prediction"),
        ("v2", f"/v2/models/{name}/infer", v2_body, v2_output, "V2 answer's data"),
    )
    for route, path, body, output, what in typed:
        try:
            status, answer = post(base + path, body)
        except OSError:
            status, answer = 0, b""
        if route == "v2":
            v2_status = status
        if status == 200:
            if not same_answer(output(answer), expected[name]):
                notes.append(f"{scenario}: {what} differs from the bare app's")
            routes.append((route, path, body))
    return routes, v2_status


def run_kiln(folder: Path, model_paths, bodies, typed_bodies, expected, args, rows, notes) -> None:
    """Each configuration once (`kiln serve`), or, with --sandbox-compare, twice side by side.

    In the comparison both servers are up together and every (route, concurrency) is loaded
    on one then the other, the order alternating from one row to the next; which of the two
    starts first alternates over the configurations.
    """
    modes = [False, True] if args.sandbox_compare else [False]
    turn = 0
    configs_started = 0
    for name in args.models:
        for config, batching, replicas in CONFIGS:
            if config not in args.configs:
                continue
            project = folder / f"kiln-{name}-{config}"
            project.mkdir()
            shutil.copy(model_paths[name], project / f"{name}.onnx")
            (project / "kiln.yaml").write_text(kiln_yaml(name, batching, replicas))
            metas: dict[bool, dict] = {}
            servers: dict[bool, tuple[Server, str]] = {}
            served: dict[bool, list] = {}
            # which server starts first: 0 1 1 0 over the four configurations, so neither
            # batching nor replicas always goes with the same start order
            flip = (configs_started + configs_started // 2) % 2
            starts = modes[::-1] if flip else modes
            configs_started += 1
            try:
                for sandbox in starts:  # started one after the other: each loads alone
                    scenario = f"kiln {name} {config}" + (SANDBOX_TAG if sandbox else "")
                    meta = {"scenario": scenario, "model": name, "config": config}
                    meta |= {"batching": batching, "replicas": replicas, "sandbox": sandbox}
                    meta["started_first"] = sandbox == starts[0]
                    metas[sandbox] = meta
                    try:
                        started = time.monotonic()
                        servers[sandbox] = start_kiln(project, args, sandbox)
                        server, base = servers[sandbox]
                        wait_ready(server, base)
                        meta["ready_s"] = round(time.monotonic() - started, 2)
                        if sandbox:
                            meta["sandbox_line"] = sandbox_line(server)
                        served[sandbox], meta["v2_probe_status"] = check_routes(
                            name, base, bodies, typed_bodies, expected, scenario, notes
                        )
                    except Exception as exc:  # one broken configuration must not lose others
                        notes.append(f"{scenario}: FAILED: {exc}")
                        print(f"  {scenario}: FAILED: {exc}", file=sys.stderr, flush=True)
                        for c in args.concurrency:
                            rows.append(
                                meta | {"route": "native", "concurrency": c, "status": "failed"}
                            )
                route_names = [r for r in ROUTES if r in args.routes]
                for route in route_names:
                    for c in args.concurrency:
                        for rnd in range(args.rounds):  # A B, then B A, ...
                            order = [m for m in modes if m in served]
                            if turn % 2:
                                order.reverse()
                            turn += 1
                            for sandbox in order:
                                found = [r for r in served[sandbox] if r[0] == route]
                                if not found:
                                    continue
                                _, path, body = found[0]
                                base = servers[sandbox][1]
                                pid = servers[sandbox][0].proc.pid
                                try:
                                    cpu_before = tree_cpu_s(pid)
                                    result = loadgen.run_load(
                                        base + path, body, c, args.duration, args.warmup
                                    )
                                    cpu = tree_cpu_s(pid) - cpu_before
                                    # warmup and measured seconds both load the server
                                    served_s = result["rps"] * (args.warmup + result["seconds"])
                                    if served_s:
                                        result["cpu_us_per_req"] = round(cpu / served_s * 1e6, 1)
                                except Exception as exc:  # noqa: BLE001 - keep the other rows
                                    scenario = metas[sandbox]["scenario"]
                                    notes.append(f"{scenario} {route} c={c}: FAILED: {exc}")
                                    rows.append(
                                        metas[sandbox]
                                        | {"route": route, "concurrency": c, "status": "failed"}
                                    )
                                    continue
                                rows.append(metas[sandbox] | {"route": route, "concurrency": c})
                                rows[-1] |= {"round": rnd, "order": order.index(sandbox)} | result
                                progress(rows[-1])
                for sandbox in served:
                    if "v2" in route_names and not any(r[0] == "v2" for r in served[sandbox]):
                        rows.append(
                            metas[sandbox] | {"route": "v2", "concurrency": None, "status": NA_V2}
                        )
            finally:
                for server, _ in servers.values():
                    server.stop()


# ----------------------------------------------------------------------------- report


def progress(row: dict) -> None:
    print(
        f"  {row['scenario']:<19} {row['route']:<7} c={row['concurrency']:<3} "
        f"{row['rps']:>9,.0f} req/s  p50 {row['p50_ms']:.2f} ms  p99 {row['p99_ms']:.2f} ms"
        + (f"  cpu {row['cpu_us_per_req']:.0f} us/req" if "cpu_us_per_req" in row else "")
        + (f"  errors {row['errors']}" if row["errors"] else ""),
        flush=True,
    )


def find(rows: list[dict], scenario: str, c: int, route: str | None = None) -> dict | None:
    for row in rows:
        if row["scenario"] == scenario and row["concurrency"] == c and "rps" in row:
            if route is None or row["route"] == route:
                return row
    return None


def annotate(rows: list[dict]) -> None:
    """Ratios against the bare app serving the same model inline, and against /fixed."""
    for row in rows:
        if not row["scenario"].startswith("kiln") or "rps" not in row:
            continue
        bare = find(rows, f"bare /{row['model']}", row["concurrency"])
        if bare and bare["rps"]:
            row["x_bare"] = round(row["rps"] / bare["rps"], 3)
            row["p50_delta_ms"] = round(row["p50_ms"] - bare["p50_ms"], 4)
            row["p99_vs_bare_ms"] = round(row["p99_ms"] - bare["p99_ms"], 4)
        fixed = find(rows, "bare /fixed", row["concurrency"])
        if row["model"] == "tiny" and fixed and fixed["rps"]:
            row["x_fixed"] = round(row["rps"] / fixed["rps"], 3)


def targets(rows: list[dict], concurrency: list[int], names=MODELS, configs=None) -> list[dict]:
    out = []
    configs = [c for c, _, _ in CONFIGS] if configs is None else configs

    def add(name: str, held: bool | None, detail: str) -> None:
        out.append({"target": name, "held": held, "detail": detail})

    batching = [cfg for cfg, b, _ in CONFIGS if b and cfg in configs]
    for route in ROUTES:
        for cfg in batching:
            for name, factor in (("tiny", TINY_VS_BARE), ("mlp", MLP_VS_BARE)):
                if name not in names:
                    continue
                label = f"c=64 {name} {cfg} {route}: req/s >= {factor}x bare /{name}" + (
                    ", p99 <= bare p99" if name == "mlp" else ""
                )
                if 64 not in concurrency:
                    add(label, None, "not measured (64 not in --concurrency)")
                    continue
                row, bare = (
                    find(rows, f"kiln {name} {cfg}", 64, route),
                    find(rows, f"bare /{name}", 64),
                )
                if row is None or bare is None:
                    if route == "native":
                        add(label, None, "not measured" + ("" if bare else " (no bare app run)"))
                    continue
                ratio = row["rps"] / bare["rps"] if bare["rps"] else 0.0
                held = ratio >= factor and row["errors"] == 0
                detail = f"{row['rps']:,.0f} vs {bare['rps']:,.0f} req/s = {ratio:.2f}x"
                if name == "mlp":
                    held = held and row["p99_ms"] <= bare["p99_ms"]
                    detail += f"; p99 {row['p99_ms']:.2f} vs {bare['p99_ms']:.2f} ms"
                if row["errors"]:
                    detail += f"; {row['errors']} errors"
                add(label, held, detail)
        for name in names:
            for cfg in configs:
                label = f"c=1 {name} {cfg} {route}: p50 within {P50_DELTA_MS} ms of bare /{name}"
                if 1 not in concurrency:
                    add(label, None, "not measured (1 not in --concurrency)")
                    continue
                row, bare = (
                    find(rows, f"kiln {name} {cfg}", 1, route),
                    find(rows, f"bare /{name}", 1),
                )
                if row is None or bare is None:
                    if route == "native":
                        add(label, None, "not measured" + ("" if bare else " (no bare app run)"))
                    continue
                delta = row["p50_ms"] - bare["p50_ms"]
                add(
                    label,
                    delta <= P50_DELTA_MS and row["errors"] == 0,
                    f"p50 {row['p50_ms']:.3f} vs {bare['p50_ms']:.3f} ms = {delta:+.3f} ms",
                )
    return out


def sandbox_pairs(rows: list[dict]) -> list[dict]:
    """Each sandboxed row beside the plain one of the same model, config, route and load.

    With --rounds N, each side is the median of its N measurements (every one stays in rows).
    """
    groups: dict[tuple, dict[bool, list[dict]]] = {}
    for row in rows:
        if row["scenario"].startswith("kiln") and "rps" in row:
            key = (row["model"], row["config"], row["route"], row["concurrency"])
            groups.setdefault(key, {}).setdefault(bool(row.get("sandbox")), []).append(row)
    pairs = []
    for (model, config, route, c), sides in groups.items():
        if len(sides) != 2:
            continue
        pair = {"model": model, "config": config, "route": route, "concurrency": c}
        pair["rounds"] = min(len(sides[False]), len(sides[True]))
        for key in ("rps", "p50_ms", "p99_ms"):
            pair[f"plain_{key}"] = statistics.median(r[key] for r in sides[False])
            pair[f"sbx_{key}"] = statistics.median(r[key] for r in sides[True])
            den = pair[f"plain_{key}"]
            pair[f"ratio_{key}"] = round(pair[f"sbx_{key}"] / den, 3) if den else None
        cpu = [[r["cpu_us_per_req"] for r in sides[m] if "cpu_us_per_req" in r] for m in (0, 1)]
        if cpu[0] and cpu[1]:
            pair["plain_cpu_us"] = statistics.median(cpu[0])
            pair["sbx_cpu_us"] = statistics.median(cpu[1])
            pair["ratio_cpu_us"] = round(pair["sbx_cpu_us"] / pair["plain_cpu_us"], 3)
        pair["plain_errors"] = sum(r["errors"] for r in sides[False])
        pair["sbx_errors"] = sum(r["errors"] for r in sides[True])
        pair["round_ratios_rps"] = [
            round(s["rps"] / p["rps"], 3) if p["rps"] else None
            for p, s in zip(sides[False], sides[True], strict=False)
        ]
        pair["sbx_first"] = sides[True][0].get("order") == 0
        pair["low"] = (
            c == 64 and pair["ratio_rps"] is not None and pair["ratio_rps"] < SANDBOX_MIN_RATIO
        )
        pairs.append(pair)
    return pairs


def pooled_ratio(pairs: list[dict], concurrency: int) -> dict | None:
    """Every (row, round) req/s ratio at one concurrency pooled: geometric mean and its 95% CI.

    One pair on a shared box varies by tens of percent; the pool says whether the sandbox
    costs anything overall, which one row alone cannot.
    """
    logs = [
        math.log(r)
        for p in pairs
        if p["concurrency"] == concurrency
        for r in p["round_ratios_rps"]
        if r
    ]
    if len(logs) < 2:
        return None
    mean, sd = statistics.mean(logs), statistics.stdev(logs)
    half = 1.96 * sd / math.sqrt(len(logs))
    return {
        "concurrency": concurrency,
        "n": len(logs),
        "geomean": round(math.exp(mean), 4),
        "ci95": [round(math.exp(mean - half), 4), round(math.exp(mean + half), 4)],
        "sd_one_pair": round(math.exp(sd) - 1, 4),
    }


def sandbox_targets(pairs: list[dict], concurrency: list[int]) -> list[dict]:
    label = f"c=64 sandboxed req/s >= {SANDBOX_MIN_RATIO}x plain `kiln serve`, every row"
    at64 = [p for p in pairs if p["concurrency"] == 64]
    if not at64:
        why = "64 not in --concurrency" if 64 not in concurrency else "no pair measured"
        return [{"target": label, "held": None, "detail": f"not measured ({why})"}]
    worst = min(at64, key=lambda p: p["ratio_rps"] or 0.0)
    low = [p for p in at64 if p["low"] or p["sbx_errors"]]
    detail = (
        f"{len(at64) - len(low)}/{len(at64)} rows hold; worst {worst['ratio_rps']:.3f}x "
        f"({worst['model']} {worst['config']} {worst['route']}: "
        f"{worst['sbx_rps']:,.0f} vs {worst['plain_rps']:,.0f} req/s)"
    )
    out = [{"target": label, "held": not low, "detail": detail}]
    pooled = pooled_ratio(pairs, 64)
    if pooled:
        lo, hi = pooled["ci95"]
        out.append(
            {
                "target": f"c=64 sandboxed req/s >= {SANDBOX_MIN_RATIO}x plain, all pairs pooled",
                "held": pooled["geomean"] >= SANDBOX_MIN_RATIO,
                "detail": f"geometric mean {pooled['geomean']:.3f}, 95% CI {lo:.3f}-{hi:.3f}",
            }
        )
    return out


def print_sandbox_table(pairs: list[dict]) -> None:
    print(
        "\nsandbox cost: `kiln serve --sandbox` (sbx) against `kiln serve` (plain), same run,"
        "\nrows interleaved; ratio = sbx req/s / plain req/s; * sbx measured first;"
        "\nwith --rounds N: medians of N measurements each, their order alternating;"
        f"\n<{SANDBOX_MIN_RATIO} flags a c=64 row under the bound"
    )
    head = (
        f"{'row':<18} {'c':>3} {'req/s':>7} {'sbx':>7} {'ratio':>6} {'p50 ms':>6} {'sbx':>6} "
        f"{'p99 ms':>6} {'sbx':>6} {'':5}"
    )
    print(head.rstrip())
    print("-" * len(head))
    last = None
    for p in pairs:
        label = f"{p['model']} {p['config']} {p['route']}"
        if last is not None and label != last:
            print()
        last = label
        ratio = f"{p['ratio_rps']:.3f}" if p["ratio_rps"] is not None else "-"
        flag = f"<{SANDBOX_MIN_RATIO}" if p["low"] else ""
        if not flag and (p["sbx_errors"] or p["plain_errors"]):
            flag = "err"
        line = (
            f"{label:<18} {p['concurrency']:>3} {p['plain_rps']:>7,.0f} {p['sbx_rps']:>7,.0f} "
            f"{ratio:>6}{'*' if p['sbx_first'] else ' '}{p['plain_p50_ms']:>6.2f} "
            f"{p['sbx_p50_ms']:>6.2f} {p['plain_p99_ms']:>6.2f} {p['sbx_p99_ms']:>6.2f} {flag}"
        )
        print(line.rstrip())
    print(
        "\nCPU per request (server + worker processes, user + system, warmup included), us;"
        "\nnoise on a shared box moves it less than req/s"
    )
    head = f"{'row':<18} {'c':>3} {'plain':>7} {'sbx':>7} {'ratio':>6}"
    print(head)
    print("-" * len(head))
    for p in pairs:
        if "ratio_cpu_us" in p:
            label = f"{p['model']} {p['config']} {p['route']}"
            print(
                f"{label:<18} {p['concurrency']:>3} {p['plain_cpu_us']:>7.1f} "
                f"{p['sbx_cpu_us']:>7.1f} {p['ratio_cpu_us']:>6.3f}"
            )
    at = {}
    for p in pairs:
        at.setdefault(p["concurrency"], []).append(p["ratio_rps"] or 0.0)
    summary = ", ".join(
        f"c={c}: {statistics.median(v):.3f} (min {min(v):.3f})" for c, v in sorted(at.items())
    )
    if summary:
        print(f"median req/s ratio by concurrency:\n  {summary}")
    pooled = pooled_ratio(pairs, 64)
    if pooled:
        print(
            f"c=64 pooled (every row and round): sbx/plain req/s geometric mean "
            f"{pooled['geomean']:.3f},\n  95% CI {pooled['ci95'][0]:.3f}-{pooled['ci95'][1]:.3f} "
            f"over {pooled['n']} pairs (one pair alone varies +-{pooled['sd_one_pair']:.0%})"
        )
    cpu = [p["ratio_cpu_us"] for p in pairs if "ratio_cpu_us" in p]
    if cpu:
        print(
            f"CPU per request ratio, all rows: median {statistics.median(cpu):.3f} "
            f"(min {min(cpu):.3f}, max {max(cpu):.3f})"
        )


def print_report(result: dict) -> None:
    m = result["machine"]
    print(
        f"\nmachine: {m['cpu_model']}, {m['cores']} cores ({m['cores_usable']} usable), "
        f"{m['memory_gib']} GiB memory; {m['platform']}, Python {m['python']}"
    )
    print(f"versions: {result['versions']}")
    print("load average at start: " + " ".join(f"{x:.2f}" for x in result["load_average_start"]))
    a = result["args"]
    print(
        f"load: closed loop, {a['duration']:g}s measured after {a['warmup']:g}s warmup per row; "
        f"client and servers share the machine's cores; Kiln's HTTP layer: {a.get('http')}; "
        f"busy-poll limit: {_poll_limit(a.get('busy_poll_us'))}"
    )

    if result["in_process"]:
        print("\n(a) in-process onnxruntime session.run, 1 thread")
        print(f"  {'model':<6} {'batch':>5} {'us/call':>10} {'rows/s':>12}")
    for r in result["in_process"]:
        print(
            f"  {r['model']:<6} {r['batch']:>5} {r['us_per_call']:>10,.1f} "
            f"{r['rows_per_s']:>12,.0f}"
        )

    print("\n(b)-(d) HTTP, closed loop (x bare: req/s over the bare app's for the same model)")
    head = (
        f"{'scenario':<19} {'route':<7} {'conc':>4} {'req/s':>9} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'errors':>6} {'x bare':>6} {'x fixed':>7} {'p50 +ms':>8}"
    )
    print(head)
    print("-" * len(head))
    last = None
    first: dict[str, int] = {}
    for i, r in enumerate(result["rows"]):
        first.setdefault(r["scenario"], i)
    for r in sorted(result["rows"], key=lambda r: first[r["scenario"]]):
        if last is not None and r["scenario"] != last:
            print()
        last = r["scenario"]
        if "rps" not in r:
            c = r["concurrency"] if r["concurrency"] is not None else "-"
            print(f"{r['scenario']:<19} {r['route']:<7} {c:>4} {r['status']}")
            continue
        xb = f"{r['x_bare']:.2f}" if "x_bare" in r else ""
        xf = f"{r['x_fixed']:.2f}" if "x_fixed" in r else ""
        d = f"{r['p50_delta_ms']:+.3f}" if "p50_delta_ms" in r else ""
        print(
            f"{r['scenario']:<19} {r['route']:<7} {r['concurrency']:>4} {r['rps']:>9,.0f} "
            f"{r['p50_ms']:>7.2f} {r['p99_ms']:>7.2f} {r['errors']:>6} {xb:>6} {xf:>7} {d:>8}"
        )

    if result.get("sandbox_compare") is not None:
        for line in sorted({r["sandbox_line"] for r in result["rows"] if r.get("sandbox_line")}):
            print(f"\nsandboxed servers said: {line}")
        print_sandbox_table(result["sandbox_compare"])

    print("\ntargets:")
    for t in result["targets"]:
        mark = {True: "HOLDS", False: "MISSED", None: "n/a"}[t["held"]]
        print(f"  [{mark:<6}] {t['target']}: {t['detail']}")
    for note in result["notes"]:
        print(f"note: {note}")
    print(f"\nwrote {result['path']}")


# ----------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per row")
    parser.add_argument("--warmup", type=float, default=1.0, help="warmup seconds per row")
    parser.add_argument("--concurrency", default="1,8,64", help="comma-separated connections")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2s rows, 0.5s warmup")
    parser.add_argument("--out", type=Path, default=HERE / "results", help="results folder")
    parser.add_argument(
        "--http",
        default=os.environ.get("KILN_HTTP", ""),
        help="Kiln's inference HTTP layer: kiln or httptools (default: KILN_HTTP or the server's)",
    )
    parser.add_argument("--models", default=",".join(MODELS), help="models to serve: tiny,mlp")
    parser.add_argument(
        "--configs",
        default=",".join(c for c, _, _ in CONFIGS),
        help="Kiln configurations to run: b0-r1,b1-r1,b0-r2,b1-r2 (b: batching, r: replicas)",
    )
    parser.add_argument("--routes", default="native,v1,v2", help="Kiln routes: native,v1,v2")
    parser.add_argument(
        "--no-baselines", action="store_true", help="skip (a) in-process and (b) the bare app"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="with --sandbox-compare: measurements of each row per mode, order alternating",
    )
    parser.add_argument(
        "--sandbox-compare",
        action="store_true",
        help="measure every Kiln row under `kiln serve` and `kiln serve --sandbox`, interleaved",
    )
    parser.add_argument(
        "--tracing",
        choices=("off", "on"),
        default="off",
        help="on: Kiln exports OpenTelemetry traces to a no-op OTLP collector in this process",
    )
    parser.add_argument(
        "--trace-sample",
        type=float,
        default=1.0,
        help="with --tracing on: the share of requests traced (OTEL_TRACES_SAMPLER="
        "parentbased_traceidratio); 1 traces every request",
    )
    parser.add_argument(
        "--busy-poll-us",
        type=int,
        default=None,
        help="passed to `kiln serve --busy-poll-us` (0: no polling; default: Kiln's own)",
    )
    args = parser.parse_args()
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    args.routes = [r.strip() for r in args.routes.split(",") if r.strip()]
    known = [c for c, _, _ in CONFIGS]
    for value, allowed, flag in (
        (args.models, MODELS, "--models"),
        (args.configs, known, "--configs"),
        (args.routes, ROUTES, "--routes"),
    ):
        if not value or any(v not in allowed for v in value):
            parser.error(f"{flag}: choose among {','.join(allowed)}")
    if not args.sandbox_compare:
        args.rounds = 1
    if args.quick:
        args.duration, args.warmup = 2.0, 0.5
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]

    global COLLECTOR
    if args.tracing == "on":
        COLLECTOR = NoopCollector()
    # SIGTERM (a background run has SIGINT ignored) unwinds too: servers are stopped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.monotonic()
    load_average = os.getloadavg()
    loadgen.build()
    machine = machine_info()
    print(
        f"machine: {machine['cpu_model']}, {machine['cores']} cores, "
        f"{machine['memory_gib']} GiB memory",
        flush=True,
    )
    rows: list[dict] = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="kiln-bench-") as tmp:
        folder = Path(tmp)
        model_paths = models.build_all(folder)
        bodies = {name: models.sample_body(name) for name in MODELS}
        typed_bodies = {name: (models.v1_body(name), models.v2_body(name)) for name in MODELS}
        expected = {}
        for name in MODELS:
            x = np.asarray(orjson.loads(bodies[name]), dtype=np.float32)[None]
            y = models.session(model_paths[name]).run(None, {"x": x})[0][0]
            expected[name] = orjson.dumps(y, option=orjson.OPT_SERIALIZE_NUMPY)

        in_proc: list[dict] = []
        if not args.no_baselines:
            print("(a) in-process onnxruntime ...", flush=True)
            in_proc = in_process(model_paths, 0.3 if args.quick else 1.0, args.models)
            print("(b) bare app ...", flush=True)
            run_bare(folder, bodies, args, rows)
        print(
            "(c)/(d) kiln serve"
            + (" and kiln serve --sandbox, interleaved" if args.sandbox_compare else "")
            + " ...",
            flush=True,
        )
        run_kiln(folder, model_paths, bodies, typed_bodies, expected, args, rows, notes)
    if COLLECTOR is not None:
        time.sleep(1.0)  # the servers' last exports (they flush at exit, within 3 s)
        counts = COLLECTOR.counts
        notes.append(
            f"tracing on: the no-op collector got {counts['exports']} exports, "
            f"{counts['bytes']} bytes, {counts['spans']} spans"
        )

    annotate(rows)
    pairs = sandbox_pairs(rows) if args.sandbox_compare else None
    checks = [] if args.no_baselines else targets(rows, args.concurrency, args.models, args.configs)
    if pairs is not None:
        checks += sandbox_targets(pairs, args.concurrency)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"data_plane-{stamp}.json"
    result = {
        "timestamp": datetime.now().isoformat(timespec="seconds"),
        "machine": machine,
        "versions": versions(),
        "args": {
            "duration": args.duration,
            "warmup": args.warmup,
            "concurrency": args.concurrency,
            "quick": args.quick,
            "http": args.http or "default",
            "models": args.models,
            "configs": args.configs,
            "routes": args.routes,
            "baselines": not args.no_baselines,
            "sandbox_compare": args.sandbox_compare,
            "rounds": args.rounds,
            "tracing": args.tracing,
            "trace_sample": args.trace_sample,
            "busy_poll_us": args.busy_poll_us,
        },
        "load_average_start": load_average,
        "batching": BATCHING,
        "in_process": in_proc,
        "rows": rows,
        "sandbox_compare": pairs,
        "sandbox_pooled": (
            [q for c in args.concurrency if (q := pooled_ratio(pairs, c))] if pairs else None
        ),
        "targets": checks,
        "notes": notes,
        "wall_s": round(time.monotonic() - started, 1),
        "path": str(path),
    }
    path.write_text(json.dumps(result, indent=2) + "\n")
    print_report(result)
    print(f"total {result['wall_s']:.0f}s")


if __name__ == "__main__":
    main()
