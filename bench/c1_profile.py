"""Where a c=1 request's time goes: system calls, CPU split and a profile of `kiln serve`.

    .venv/bin/python bench/c1_profile.py [--model tiny|mlp] [--requests 2000]
        [--routes native,v1,v2] [--mode cpu|strace|cprofile] [--batching]

Starts `kiln serve` on one model (one replica), warms each route with 500 requests,
then sends `--requests` sequential requests over one keep-alive connection
(http.client) and reports per route:

- `cpu`: p50 and mean latency, and the CPU the server and its worker spent per
  request (from /proc/PID/task/*/schedstat, so system time is included);
- `strace`: `strace -c -f` of the server and the worker during the requests; the
  counts divided by `--requests` are the system calls and event-loop turns
  (`epoll_pwait`) per request (docs/performance.md, "Where the c=1 time goes");
- `cprofile`: the server runs under cProfile; the per-request table of its
  functions is printed at exit (calls seen at least 0.9x per request).

The client is Python, so latencies are higher than bench/data_plane.py's C
client gives; use this to attribute, and data_plane.py to measure.
"""

from __future__ import annotations

import argparse
import glob
import http.client
import json
import os
import pstats
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import models  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def task_cpu_ns(pid: int) -> int:
    total = 0
    for path in glob.glob(f"/proc/{pid}/task/*/schedstat"):
        try:
            total += int(Path(path).read_text().split()[0])
        except OSError:
            pass
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny", choices=["tiny", "mlp"])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--routes", default="native,v1,v2")
    parser.add_argument("--mode", default="cpu", choices=["cpu", "strace", "cprofile"])
    parser.add_argument("--batching", action="store_true", help="64 rows / 2 ms")
    args = parser.parse_args()
    name = args.model
    root = Path(tempfile.mkdtemp(prefix="kiln-c1-"))
    paths = models.build_all(root)
    project = root / "project"
    project.mkdir()
    shutil.copy(paths[name], project / f"{name}.onnx")
    config = f"- kind: api\n  name: {name}\n  onnx:\n    model: {name}.onnx\n"
    if args.batching:
        config += "  batching: {max_batch_size: 64, max_batch_delay_ms: 2}\n"
    (project / "kiln.yaml").write_text(config + "  compute: {min_replicas: 1, cpu: 1}\n")
    port = free_port()
    profile = root / "server.prof"
    pre = ["-m", "cProfile", "-o", str(profile)] if args.mode == "cprofile" else []
    server = subprocess.Popen(
        [sys.executable, *pre, "-m", "kiln.cli.main", "serve", str(project)]
        + ["--port", str(port), "--management-port", "0", "--metrics-port", "0"]
        + ["--grpc-port", "0"]
        + ["--home", str(root / "state")],
        stdout=open(root / "serve.log", "wb"),  # noqa: SIM115 - lives as long as the server
        stderr=subprocess.STDOUT,
        env={**os.environ, "KILN_HOME": str(root / "home")},
        start_new_session=True,
    )
    bodies = {
        "native": (f"/{name}", models.sample_body(name)),
        "v1": (f"/v1/models/{name}:predict", models.v1_body(name)),
        "v2": (f"/v2/models/{name}/infer", models.v2_body(name)),
    }
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                probe = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                probe.request("GET", "/apis")
                apis = json.loads(probe.getresponse().read())["apis"]
                if apis and all(a["status"] == "ready" for a in apis):
                    break
            except (OSError, ValueError, KeyError):
                pass
            if time.monotonic() > deadline or server.poll() is not None:
                raise SystemExit((root / "serve.log").read_text()[-3000:])
            time.sleep(0.2)
        out = subprocess.run(
            ["ps", "-o", "pid=", "--ppid", str(server.pid)], capture_output=True, text=True
        )
        workers = [int(p) for p in out.stdout.split()]
        conn = http.client.HTTPConnection("127.0.0.1", port)

        def drive(route: str, count: int) -> list[float]:
            path, body = bodies[route]
            latencies = []
            for _ in range(count):
                started = time.perf_counter()
                conn.request("POST", path, body, {"content-type": "application/json"})
                response = conn.getresponse()
                response.read()
                latencies.append(time.perf_counter() - started)
                if response.status != 200:
                    raise SystemExit(f"{route}: HTTP {response.status}")
            return sorted(latencies)

        n = args.requests
        for route in args.routes.split(","):
            drive(route, 500)
            if args.mode == "strace":
                tracers = [
                    subprocess.Popen(
                        ["strace", "-c", "-f", "-p", str(pid), "-o", str(root / f"{route}-{pid}")],
                        stderr=subprocess.DEVNULL,
                    )
                    for pid in [server.pid, *workers]
                ]
                time.sleep(1.0)
                drive(route, n)
                time.sleep(0.2)
                for tracer in tracers:
                    tracer.send_signal(signal.SIGINT)
                    tracer.wait()
                for pid, who in [(server.pid, "server"), *((w, "worker") for w in workers)]:
                    counts = []
                    for line in (root / f"{route}-{pid}").read_text().splitlines():
                        parts = line.split()
                        if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] != "total":
                            calls = int(parts[3])
                            if calls >= n * 0.5:
                                counts.append(f"{parts[-1]} {calls / n:.2f}")
                    print(f"{route:<7} {who}: " + ", ".join(counts) + " per request")
            else:
                before = [task_cpu_ns(p) for p in [server.pid, *workers]]
                started = time.perf_counter()
                latencies = drive(route, n)
                wall = time.perf_counter() - started
                after = [task_cpu_ns(p) for p in [server.pid, *workers]]
                cpu = [(b - a) / n / 1e3 for a, b in zip(before, after, strict=True)]
                print(
                    f"{route:<7} p50 {latencies[n // 2] * 1e3:.3f} ms, mean {wall / n * 1e3:.3f}"
                    f" ms; CPU per request: server {cpu[0]:.1f} us, worker "
                    + ", ".join(f"{c:.1f}" for c in cpu[1:])
                    + " us"
                )
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
    if args.mode == "cprofile" and profile.exists():
        stats = pstats.Stats(str(profile))
        total = (args.requests + 500) * len(args.routes.split(","))
        rows = []
        for (path, line, func), (_, calls, tottime, cumtime, _) in stats.stats.items():  # type: ignore[attr-defined]
            if calls >= total * 0.9:
                where = path.split("site-packages/")[-1].split("src/")[-1]
                rows.append(
                    (tottime / total * 1e6, cumtime / total * 1e6, calls / total, where, line, func)
                )
        print(f"{'tot us/req':>10} {'cum us/req':>10} {'calls/req':>9}")
        for tot, cum, calls, where, line, func in sorted(rows, reverse=True)[:40]:
            print(f"{tot:10.2f} {cum:10.2f} {calls:9.2f}  {where}:{line}({func})")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
