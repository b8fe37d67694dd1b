"""What moving a request to a worker process and back costs, without HTTP.

Rows: one `Replica.submit_batch` round trip (server -> worker -> server) to a
real worker process running an identity ONNX model, for a JSON body and for
typed tensors (raw buffers, V2 style) of growing size, against the same model
called in-process. The difference is Kiln's IPC cost per request.

Run: .venv/bin/python bench/ipc_cost.py [--n 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import orjson


def build_identity(path: Path, features: int) -> None:
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", features])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", features])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "id", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)


async def measure(model: Path, features: int, rows: int, n: int) -> dict[str, float]:
    import onnxruntime as ort

    from kiln.serving.replica import Replica
    from kiln.serving.types import InferenceRequest, Tensor, WorkerSpec

    data = np.random.default_rng(0).random((rows, features), dtype=np.float32)
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    started = time.perf_counter()
    for _ in range(n):
        session.run(None, {"x": data})
    in_process = (time.perf_counter() - started) / n * 1e6

    replica = Replica(
        WorkerSpec(api="ipc", version=None, runtime="onnx", model_path=str(model)),
        cwd=str(model.parent),
        env=dict(os.environ),
        log_line=lambda line, replica=None: None,
    )
    await replica.start(60)
    body = orjson.dumps(data, option=orjson.OPT_SERIALIZE_NUMPY)
    json_request = InferenceRequest("ipc", None, "r", body)
    tensor_request = InferenceRequest(
        "ipc",
        None,
        "r",
        b"",
        kind="tensors",
        want_tensors=True,
        tensors=[Tensor("x", "FP32", [rows, features], data)],
    )
    results = {"in_process_us": in_process, "json_bytes": len(body), "raw_bytes": data.nbytes}
    for name, request in (("json_us", json_request), ("tensors_us", tensor_request)):
        for _ in range(50):
            await replica.submit_batch([request], 10)
        started = time.perf_counter()
        for _ in range(n):
            outcome = (await replica.submit_batch([request], 10))[0]
        results[name] = (time.perf_counter() - started) / n * 1e6
        assert not isinstance(outcome, BaseException), outcome
    await replica.stop(5)
    return results


def run(coro):  # the server's own event loop: uvloop when installed
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=2000)
    args = parser.parse_args()
    print(
        f"{'payload':<22} {'in-process':>11} {'JSON body':>10} {'raw tensors':>12} "
        f"{'IPC cost (tensors)':>19}"
    )
    print("-" * 78)
    with tempfile.TemporaryDirectory() as tmp:
        for rows, features in ((1, 16), (64, 256), (256, 1024)):
            model = Path(tmp) / f"id{features}.onnx"
            build_identity(model, features)
            n = args.n if rows * features < 100_000 else max(50, args.n // 20)
            r = run(measure(model, features, rows, n))
            label = f"{rows}x{features} FP32 ({r['raw_bytes'] // 1024} KiB)"
            print(
                f"{label:<22} {r['in_process_us']:>9.1f}us {r['json_us']:>8.1f}us "
                f"{r['tensors_us']:>10.1f}us {r['tensors_us'] - r['in_process_us']:>17.1f}us"
            )


if __name__ == "__main__":
    main()
