"""Kiln's data plane against the limits of the same machine, measured in the same run.

  (a) in-process    onnxruntime `session.run` alone (1 thread), tiny and mlp, batch 1/8/32/64
  (b) bare app      bench/bare_app.py: /fixed (HTTP stack alone), /tiny and /mlp (the model run
                    inline in the request handler): what a hand-written server gets
  (c) kiln tiny     `kiln serve` of tiny.onnx, (d) kiln mlp: the same for mlp.onnx, each with
                    batching off/on x 1/2 replicas, on the native route and the V2 (Open
                    Inference Protocol) route when the server answers it

Load: bench/loadgen.c, closed loop, C keep-alive connections, per-request latency.
Writes bench/results/data_plane-<timestamp>.json.

Run: .venv/bin/python bench/data_plane.py [--duration 5] [--concurrency 1,8,64] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
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
BATCHING = {"max_batch_size": 32, "max_batch_delay_ms": 2}
CONFIGS = [
    ("b0-r1", None, 1),
    ("b1-r1", BATCHING, 1),
    ("b0-r2", None, 2),
    ("b1-r2", BATCHING, 2),
]
NA_V2 = "n/a (not served yet)"
# Targets (see bench/README.md)
TINY_VS_BARE = 1.0  # at c=64 with batching: tiny req/s >= 1.0x bare /tiny
MLP_VS_BARE = 1.8  # at c=64 with batching: mlp req/s >= 1.8x bare /mlp, p99 <= bare p99
P50_DELTA_MS = 0.3  # at c=1: Kiln p50 within 0.3 ms of the bare app's for the same model


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


def in_process(model_paths: dict[str, Path], seconds: float) -> list[dict]:
    rows = []
    for name in MODELS:
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
        routes = [("/fixed", bodies["tiny"]), ("/tiny", bodies["tiny"]), ("/mlp", bodies["mlp"])]
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


def v2_output(got: bytes) -> bytes:
    """The data of a V2 answer's first output, as a JSON list, to compare with the bare one."""
    try:
        return orjson.dumps(orjson.loads(got)["outputs"][0]["data"])
    except (ValueError, KeyError, IndexError, TypeError):
        return b"null"


def run_kiln(folder: Path, model_paths, bodies, v2_bodies, expected, args, rows, notes) -> None:
    for name in MODELS:
        for config, batching, replicas in CONFIGS:
            project = folder / f"kiln-{name}-{config}"
            project.mkdir()
            shutil.copy(model_paths[name], project / f"{name}.onnx")
            (project / "kiln.yaml").write_text(kiln_yaml(name, batching, replicas))
            port = free_port()
            env = {**os.environ, "KILN_HOME": str(project / "home")}
            if args.http:  # the inference port's HTTP layer (kiln or uvicorn's httptools)
                env["KILN_HTTP"] = args.http
            server = Server(
                [sys.executable, "-m", "kiln.cli.main", "serve", str(project)]
                + ["--port", str(port), "--management-port", "0", "--metrics-port", "0"]
                + ["--home", str(project / "state")],
                project / "serve.log",
                env,
            )
            base = f"http://127.0.0.1:{port}"
            scenario = f"kiln {name} {config}"
            meta = {"scenario": scenario, "model": name, "config": config}
            meta |= {"batching": batching, "replicas": replicas}
            try:
                started = time.monotonic()
                wait_ready(server, base)
                meta["ready_s"] = round(time.monotonic() - started, 2)
                status, answer = post(f"{base}/{name}", bodies[name])
                if status != 200:
                    raise RuntimeError(f"POST /{name} answered {status}: {answer[:300]!r}")
                if not same_answer(answer, expected[name]):
                    notes.append(f"{scenario}: native answer differs from the bare app's")
                routes = [("native", f"/{name}", bodies[name])]
                v2_path = f"/v2/models/{name}/infer"
                try:
                    v2_status, v2_answer = post(base + v2_path, v2_bodies[name])
                except OSError:
                    v2_status, v2_answer = 0, b""
                if v2_status == 200:
                    if not same_answer(v2_output(v2_answer), expected[name]):
                        notes.append(f"{scenario}: V2 answer's data differs from the bare app's")
                    routes.append(("v2", v2_path, v2_bodies[name]))
                for route, path, body in routes:
                    for c in args.concurrency:
                        result = loadgen.run_load(base + path, body, c, args.duration, args.warmup)
                        rows.append(meta | {"route": route, "concurrency": c} | result)
                        progress(rows[-1])
                if v2_status != 200:
                    rows.append(
                        meta
                        | {"route": "v2", "concurrency": None, "status": NA_V2}
                        | {"probe_status": v2_status}
                    )
            except Exception as exc:  # one broken configuration must not lose the others
                notes.append(f"{scenario}: FAILED: {exc}")
                print(f"  {scenario}: FAILED: {exc}", file=sys.stderr, flush=True)
                for c in args.concurrency:
                    rows.append(meta | {"route": "native", "concurrency": c, "status": "failed"})
            finally:
                server.stop()


# ----------------------------------------------------------------------------- report


def progress(row: dict) -> None:
    print(
        f"  {row['scenario']:<17} {row['route']:<7} c={row['concurrency']:<3} "
        f"{row['rps']:>9,.0f} req/s  p50 {row['p50_ms']:.2f} ms  p99 {row['p99_ms']:.2f} ms"
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


def targets(rows: list[dict], concurrency: list[int]) -> list[dict]:
    out = []

    def add(name: str, held: bool | None, detail: str) -> None:
        out.append({"target": name, "held": held, "detail": detail})

    batching = [cfg for cfg, b, _ in CONFIGS if b]
    for route in ("native", "v2"):
        for cfg in batching:
            for name, factor in (("tiny", TINY_VS_BARE), ("mlp", MLP_VS_BARE)):
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
                        add(label, None, "not measured (failed)")
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
        for name in MODELS:
            for cfg, _, _ in CONFIGS:
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
                        add(label, None, "not measured (failed)")
                    continue
                delta = row["p50_ms"] - bare["p50_ms"]
                add(
                    label,
                    delta <= P50_DELTA_MS and row["errors"] == 0,
                    f"p50 {row['p50_ms']:.3f} vs {bare['p50_ms']:.3f} ms = {delta:+.3f} ms",
                )
    return out


def print_report(result: dict) -> None:
    m = result["machine"]
    print(
        f"\nmachine: {m['cpu_model']}, {m['cores']} cores ({m['cores_usable']} usable), "
        f"{m['memory_gib']} GiB memory; {m['platform']}, Python {m['python']}"
    )
    print(f"versions: {result['versions']}")
    a = result["args"]
    print(
        f"load: closed loop, {a['duration']:g}s measured after {a['warmup']:g}s warmup per row; "
        f"client and servers share the machine's cores; Kiln's HTTP layer: {a.get('http')}"
    )

    print("\n(a) in-process onnxruntime session.run, 1 thread")
    print(f"  {'model':<6} {'batch':>5} {'us/call':>10} {'rows/s':>12}")
    for r in result["in_process"]:
        print(
            f"  {r['model']:<6} {r['batch']:>5} {r['us_per_call']:>10,.1f} "
            f"{r['rows_per_s']:>12,.0f}"
        )

    print("\n(b)-(d) HTTP, closed loop (x bare: req/s over the bare app's for the same model)")
    head = (
        f"{'scenario':<17} {'route':<7} {'conc':>4} {'req/s':>9} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'errors':>6} {'x bare':>6} {'x fixed':>7} {'p50 +ms':>8}"
    )
    print(head)
    print("-" * len(head))
    last = None
    for r in result["rows"]:
        if last is not None and r["scenario"] != last:
            print()
        last = r["scenario"]
        if "rps" not in r:
            c = r["concurrency"] if r["concurrency"] is not None else "-"
            print(f"{r['scenario']:<17} {r['route']:<7} {c:>4} {r['status']}")
            continue
        xb = f"{r['x_bare']:.2f}" if "x_bare" in r else ""
        xf = f"{r['x_fixed']:.2f}" if "x_fixed" in r else ""
        d = f"{r['p50_delta_ms']:+.3f}" if "p50_delta_ms" in r else ""
        print(
            f"{r['scenario']:<17} {r['route']:<7} {r['concurrency']:>4} {r['rps']:>9,.0f} "
            f"{r['p50_ms']:>7.2f} {r['p99_ms']:>7.2f} {r['errors']:>6} {xb:>6} {xf:>7} {d:>8}"
        )

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
    args = parser.parse_args()
    if args.quick:
        args.duration, args.warmup = 2.0, 0.5
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]

    started = time.monotonic()
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
        v2_bodies = {name: models.v2_body(name) for name in MODELS}
        expected = {}
        for name in MODELS:
            x = np.asarray(orjson.loads(bodies[name]), dtype=np.float32)[None]
            y = models.session(model_paths[name]).run(None, {"x": x})[0][0]
            expected[name] = orjson.dumps(y, option=orjson.OPT_SERIALIZE_NUMPY)

        print("(a) in-process onnxruntime ...", flush=True)
        in_proc = in_process(model_paths, 0.3 if args.quick else 1.0)
        print("(b) bare app ...", flush=True)
        run_bare(folder, bodies, args, rows)
        print("(c)/(d) kiln serve ...", flush=True)
        run_kiln(folder, model_paths, bodies, v2_bodies, expected, args, rows, notes)

    annotate(rows)
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
        },
        "batching": BATCHING,
        "in_process": in_proc,
        "rows": rows,
        "targets": targets(rows, args.concurrency),
        "notes": notes,
        "wall_s": round(time.monotonic() - started, 1),
        "path": str(path),
    }
    path.write_text(json.dumps(result, indent=2) + "\n")
    print_report(result)
    print(f"total {result['wall_s']:.0f}s")


if __name__ == "__main__":
    main()
