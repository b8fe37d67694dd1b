"""gRPC vs REST on the Open Inference Protocol (V2), on one `kiln serve`, with a limit.

  rest   POST /v2/models/tiny/infer (JSON), bench/loadgen.c: closed loop, keep-alive
  grpc   inference.GRPCInferenceService/ModelInfer with raw_input_contents (what
         tritonclient sends), a grpc.aio client in its own process
  bare   a bare grpc.aio server in its own process that decodes the request and answers a
         fixed ModelInferResponse: what gRPC itself costs here (the limit), measured with the
         same client

One model (bench/models.py tiny.onnx: 16 -> 4), batching off, one replica; concurrency 1
and 64 by default. The gRPC client is Python: on a 2-core box it competes with the server
for CPU, so the gRPC rows are a lower bound (the bare row shows how much the client
itself allows). Writes bench/results/grpc_vs_rest-<timestamp>.json.

Run: .venv/bin/python bench/grpc_vs_rest.py [--duration 5] [--concurrency 1,64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson

HERE = Path(__file__).parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import loadgen  # noqa: E402
from models import build_tiny, sample_input, v2_body  # noqa: E402

MODEL = "tiny"


def _infer_request() -> Any:
    from kiln.protocols.grpc.messages import message

    x = sample_input(MODEL)
    request = message("inference.ModelInferRequest")(model_name=MODEL)
    request.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.astype("<f4").tobytes())
    return request


# ----- the gRPC client (its own process) ----------------------------------------------------
async def _client(address: str, concurrency: int, duration: float, warmup: float) -> dict:
    import grpc

    from kiln.protocols.grpc.messages import message

    request = _infer_request().SerializeToString()
    response_type = message("inference.ModelInferResponse")
    channels = [grpc.aio.insecure_channel(address) for _ in range(min(concurrency, 4))]
    calls = [
        ch.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=None,  # the request is sent as its bytes
            response_deserializer=response_type.FromString,
        )
        for ch in channels
    ]
    latencies: list[float] = []
    errors = 0
    start = time.perf_counter()
    measure_from = start + warmup
    stop_at = measure_from + duration

    async def loop(i: int) -> None:
        nonlocal errors
        call = calls[i % len(calls)]
        while True:
            t0 = time.perf_counter()
            if t0 >= stop_at:
                return
            try:
                await call(request, timeout=30)
            except grpc.RpcError:
                errors += 1
                continue
            t1 = time.perf_counter()
            if t0 >= measure_from:
                latencies.append(t1 - t0)

    await asyncio.gather(*(loop(i) for i in range(concurrency)))
    for ch in channels:
        await ch.close()
    latencies.sort()
    n = len(latencies)
    return {
        "requests": n,
        "errors": errors,
        "rps": n / duration,
        "p50_ms": statistics.median(latencies) * 1000 if n else None,
        "p99_ms": latencies[min(n - 1, int(n * 0.99))] * 1000 if n else None,
    }


def grpc_load(address: str, concurrency: int, duration: float, warmup: float = 0.5) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "--client", address, "--client-concurrency", str(concurrency),
         "--duration", str(duration), "--warmup", str(warmup)],
        capture_output=True, text=True, timeout=warmup + duration + 60, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"gRPC client failed: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout)


# ----- the bare grpcio server (its own process) ---------------------------------------------
async def _bare_server(port_file: Path) -> None:
    import grpc

    from kiln.protocols.grpc.messages import message

    request_type = message("inference.ModelInferRequest")
    answer = message("inference.ModelInferResponse")(model_name=MODEL)
    answer.outputs.add(name="y", datatype="FP32", shape=[1, 4])
    answer.raw_output_contents.append(np.zeros((1, 4), "<f4").tobytes())
    fixed = answer.SerializeToString()

    async def infer(request: Any, context: Any) -> bytes:
        return fixed

    handler = grpc.method_handlers_generic_handler(
        "inference.GRPCInferenceService",
        {
            "ModelInfer": grpc.unary_unary_rpc_method_handler(
                infer, request_deserializer=request_type.FromString, response_serializer=None
            )
        },
    )
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    port_file.write_text(str(port))
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await server.stop(1)


def _start_bare(folder: Path) -> tuple[subprocess.Popen, str]:
    port_file = folder / "bare.port"
    proc = subprocess.Popen([sys.executable, __file__, "--bare-server", str(port_file)])
    deadline = time.monotonic() + 30
    while not port_file.exists() or not port_file.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the bare gRPC server did not start")
        time.sleep(0.05)
    return proc, f"127.0.0.1:{port_file.read_text()}"


# ----- Kiln ---------------------------------------------------------------------------------
def _start_kiln(folder: Path) -> tuple[subprocess.Popen, dict]:
    build_tiny(folder / "tiny.onnx")
    (folder / "kiln.yaml").write_text(
        f"- kind: api\n  name: {MODEL}\n  onnx: {{model: tiny.onnx}}\n"
    )
    home = folder / "state"
    proc = subprocess.Popen(
        [sys.executable, "-m", "kiln.cli.main", "serve", str(folder), "--port", "0",
         "--management-port", "0", "--metrics-port", "0", "--grpc-port", "0", "--home", str(home)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    info_path = home / "server.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if info_path.exists():
            try:
                info = orjson.loads(info_path.read_bytes())
            except orjson.JSONDecodeError:
                info = None
            if info and info.get("grpc"):
                return proc, info
        if proc.poll() is not None:
            raise RuntimeError("kiln serve exited while starting")
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError("kiln serve did not start in 120 s")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # kiln serve drains and stops its workers
        try:
            proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--concurrency", default="1,64")
    parser.add_argument("--client", help=argparse.SUPPRESS)
    parser.add_argument("--client-concurrency", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--bare-server", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        result = asyncio.run(
            _client(args.client, args.client_concurrency, args.duration, args.warmup)
        )
        print(json.dumps(result))
        return 0
    if args.bare_server:
        asyncio.run(_bare_server(args.bare_server))
        return 0

    levels = [int(c) for c in args.concurrency.split(",")]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="kiln-grpc-bench-") as tmp:
        folder = Path(tmp)
        kiln, info = _start_kiln(folder)
        bare, bare_address = _start_bare(folder)
        try:
            url = f"{info['url']}/v2/models/{MODEL}/infer"
            for c in levels:
                for name, run in (
                    (
                        "rest",
                        lambda c=c: loadgen.run_load(
                            url, v2_body(MODEL), c, args.duration, args.warmup
                        ),
                    ),
                    (
                        "grpc",
                        lambda c=c: grpc_load(
                            info["grpc"]["address"], c, args.duration, args.warmup
                        ),
                    ),
                    (
                        "bare grpc",
                        lambda c=c: grpc_load(bare_address, c, args.duration, args.warmup),
                    ),
                ):
                    result = run()
                    rows.append({"transport": name, "concurrency": c, **result})
                    p50 = result.get("p50_ms")
                    print(
                        f"{name:10} c={c:<3} {result['rps']:9.0f} req/s  p50 "
                        f"{p50 if p50 is None else round(p50, 3)} ms  "
                        f"errors {result.get('errors', 0)}",
                        flush=True,
                    )
        finally:
            _stop(bare)
            _stop(kiln)
    out = HERE / "results" / f"grpc_vs_rest-{datetime.now():%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(
        json.dumps(
            {"model": MODEL, "duration_s": args.duration, "cores": os.cpu_count(), "rows": rows},
            indent=2,
        )
    )
    print(f"wrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
