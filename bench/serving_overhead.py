"""How much does Kiln add to a model's own time? Measured against limits from the same run.

Rows:
  model in-process      onnxruntime `session.run` on one row, plus orjson decode/encode:
                        the floor no server can beat
  bare ASGI app         bench/bare_app.py's /fixed (Starlette on uvicorn + httptools, a fixed
                        body): the ceiling of the HTTP stack
  kiln serve (onnx)     the full path: HTTP, routing, IPC to the worker, JSON -> tensor, model,
                        JSON back
  kiln serve (python)   the same with a Python handler that echoes its input

Run: .venv/bin/python bench/serving_overhead.py [--duration 5] [--concurrency 1,16]
(bench/data_plane.py is the fuller data-plane benchmark: batching, replicas, bigger model.)
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import orjson

sys.path.insert(0, str(Path(__file__).parent))
from loadgen import build, run_load  # noqa: E402

ROOT = Path(__file__).parents[1]
BODY = b"[5.1, 3.5, 1.4, 0.2]"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def build_project(folder: Path) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weights = numpy_helper.from_array(np.random.default_rng(0).random((4, 3), np.float32), "W")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["y"], axis=-1),
    ]
    graph = helper.make_graph(nodes, "bench", [x], [y], [weights])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, folder / "model.onnx")
    (folder / "echo.py").write_text("def predict(payload, context):\n    return payload\n")
    (folder / "kiln.yaml").write_text(
        "- kind: api\n  name: onnx\n  onnx:\n    model: model.onnx\n"
        "- kind: api\n  name: echo\n  python:\n    handler: echo.py\n"
    )


def in_process_us(folder: Path, n: int = 20000) -> float:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(
        str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"]
    )
    started = time.perf_counter()
    for _ in range(n):
        x = np.asarray(orjson.loads(BODY), dtype=np.float32)[None]
        out = session.run(None, {"x": x})[0][0]
        orjson.dumps(out, option=orjson.OPT_SERIALIZE_NUMPY)
    return (time.perf_counter() - started) / n * 1e6


def wait_http(url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            httpx.post(url, content=BODY, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not come up")


class _Result:
    def __init__(self, answer: dict) -> None:
        self.rps = answer["rps"]
        self.errors = answer["errors"]
        self._p = {50: answer["p50_ms"], 90: answer["p90_ms"], 99: answer["p99_ms"]}

    def percentile(self, q: int) -> float:
        return self._p[q]


def measure(url: str, concurrency: list[int], duration: float) -> list[tuple[int, _Result]]:
    return [(c, _Result(run_load(url, BODY, c, duration, warmup=0.5))) for c in concurrency]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--concurrency", default="1,16")
    args = parser.parse_args()
    concurrency = [int(c) for c in args.concurrency.split(",")]
    build()
    table: list[tuple[str, int, float, float, float, int]] = []

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        build_project(folder)
        floor = in_process_us(folder)

        port = free_port()
        bare = subprocess.Popen([sys.executable, str(ROOT / "bench" / "bare_app.py"), str(port)])
        try:
            wait_http(f"http://127.0.0.1:{port}/fixed")
            for c, r in measure(f"http://127.0.0.1:{port}/fixed", concurrency, args.duration):
                table.append(
                    ("bare ASGI app", c, r.rps, r.percentile(50), r.percentile(99), r.errors)
                )
        finally:
            bare.terminate()
            bare.wait()

        port = free_port()
        env = {**os.environ, "KILN_HOME": str(folder / "home")}
        kiln = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kiln.cli.main",
                "serve",
                str(folder),
                "--port",
                str(port),
                "--management-port",
                "0",
                "--metrics-port",
                "0",
                "--grpc-port",
                "0",
                "--home",
                str(folder / "state"),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            for api in ("onnx", "echo"):
                url = f"http://127.0.0.1:{port}/{api}"
                wait_http(url)
                for c, r in measure(url, concurrency, args.duration):
                    table.append(
                        (
                            f"kiln serve ({api})",
                            c,
                            r.rps,
                            r.percentile(50),
                            r.percentile(99),
                            r.errors,
                        )
                    )
        finally:
            kiln.terminate()
            kiln.wait()

    print(
        f"\nmodel in-process (onnxruntime + orjson, 1 row): {floor:.1f} us per call "
        f"({1e6 / floor:,.0f} calls/s on one core)\n"
    )
    print(f"{'scenario':<22} {'conc':>5} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}")
    print("-" * 64)
    for name, c, rps, p50, p99, errors in table:
        print(f"{name:<22} {c:>5} {rps:>9,.0f} {p50:>8.2f} {p99:>8.2f} {errors:>7}")
    bare_by_c = {c: p50 for name, c, _, p50, _, _ in table if name == "bare ASGI app"}
    print("\nKiln's added latency over the bare HTTP stack at p50 (model time included):")
    for name, c, _, p50, _, _ in table:
        if name.startswith("kiln") and c in bare_by_c:
            print(f"  {name:<22} conc {c:>3}: +{(p50 - bare_by_c[c]) * 1000:,.0f} us")


if __name__ == "__main__":
    main()
