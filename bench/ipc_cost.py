"""What one batch costs to frame: the typed messages against the msgpack dicts they replaced.

Each row is one full round trip of headers as the server and a worker make them,
without the socket: the server encodes a batch frame of native JSON requests, the
worker decodes it and reads every item's fields, builds one reply per item and
encodes the reply frame, and the server decodes it into `InferenceResponse`s.
"before" is a frozen copy of the code that spoke msgpack dicts with two-letter
keys (up to the commit that introduced kiln.serving.messages); "msgspec" is the
code in use (kiln.serving.wire, kiln.serving.ipc, kiln.serving.messages).

    .venv/bin/python bench/ipc_cost.py [--seconds 3]

Prints a table: microseconds per round trip (the best of many interleaved short
rounds), and the batch header's bytes. With --process, a second table: one
`Replica.submit_batch` round trip to a real worker process running an identity
ONNX model, for a JSON body and for raw tensors, against the in-process call.
"""

from __future__ import annotations

import argparse
import asyncio
import struct
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import orjson

from kiln.serving.ipc import decode_frame, encode_frame
from kiln.serving.messages import FROM_WORKER, TO_WORKER, Batch, BatchReply, ReplyItem
from kiln.serving.types import InferenceRequest, InferenceResponse
from kiln.serving.wire import decode_outcomes, encode_request, split_items

# ----- before: msgpack dicts (frozen copy of the replaced code) ------------------------


def old_encode_frame(header: dict[str, Any], buffers: list[bytes]) -> list[bytes]:
    header = dict(header)
    header["b"] = [len(b) for b in buffers]
    packed = msgpack.packb(header, use_bin_type=True)
    total = 4 + len(packed) + sum(header["b"])
    return [struct.pack("!II", total, len(packed)), packed, *buffers]


def old_decode_frame(payload: bytes) -> tuple[dict[str, Any], list[memoryview]]:
    view = memoryview(payload)
    (header_len,) = struct.unpack_from("!I", view, 0)
    header = msgpack.unpackb(view[4 : 4 + header_len], raw=False)
    buffers: list[memoryview] = []
    offset = 4 + header_len
    for length in header.pop("b", ()):
        buffers.append(view[offset : offset + length])
        offset += length
    return header, buffers


def old_encode_request(request: InferenceRequest) -> tuple[dict[str, Any], list[Any]]:
    item: dict[str, Any] = {"rid": request.request_id}
    if request.debug:
        item["dbg"] = True
    if request.protocol != "native":
        item["proto"] = request.protocol
    if request.headers:
        item["hdr"] = request.headers
    if request.query:
        item["q"] = request.query
    if request.want_tensors:
        item["wt"] = True
    buffers = [request.body]
    item["nb"] = len(buffers)
    return item, buffers


def old_split(items: list[dict[str, Any]], buffers: list[Any]) -> list[list[Any]]:
    out, offset = [], 0
    for item in items:
        count = item.get("nb", 1)
        out.append(buffers[offset : offset + count])
        offset += count
    return out


def old_round_trip(requests: list[InferenceRequest]) -> list[Any]:
    items, buffers = [], []
    for request in requests:
        item, owned = old_encode_request(request)
        items.append(item)
        buffers.extend(owned)
    chunks = old_encode_frame({"op": "batch", "id": 1, "items": items}, buffers)
    header, got = old_decode_frame(b"".join(chunks)[4:])
    # the worker reads what it needs of each item, and answers each one
    replies, out = [], []
    for item, owned in zip(header["items"], old_split(header["items"], got), strict=True):
        _ = (item.get("rid", ""), item.get("proto", "native"), item.get("hdr") or {})
        _ = (item.get("q") or {}, bool(item.get("wt")), item.get("k", "json"), item.get("dbg"))
        replies.append({"ok": True, "ct": "application/json", "nb": 1})
        out.append(bytes(owned[0]))
    chunks = old_encode_frame({"id": 1, "items": replies, "n": len(replies)}, out)
    reply, got = old_decode_frame(b"".join(chunks)[4:])
    outcomes = []
    for item, owned in zip(reply["items"], old_split(reply["items"], got), strict=True):
        stages = [tuple(s) for s in item.get("dbg", ())]
        outcomes.append(
            InferenceResponse(
                body=bytes(owned[0]) if owned else b"",
                content_type=item.get("ct", "application/json"),
                status=item.get("st", 200),
                headers=item.get("hd") or {},
                debug_stages=stages,  # type: ignore[arg-type]
                batch_size=reply.get("n", 1),
                tensors=None,
                tracked=item.get("tv"),
            )
        )
    return outcomes


# ----- now: typed messages ----------------------------------------------------------------


def new_round_trip(requests: list[InferenceRequest]) -> list[Any]:
    items, buffers = [], []
    for request in requests:
        item, owned = encode_request(request)
        items.append(item)
        buffers.extend(owned)
    chunks = encode_frame(Batch(1, items), buffers)
    batch, got = decode_frame(b"".join(chunks)[4:], TO_WORKER)
    assert isinstance(batch, Batch)
    replies, out = [], []
    for item, owned in zip(batch.items, split_items(batch.items, got), strict=True):
        _ = (item.request_id, item.protocol, item.headers or {}, item.query or {})
        _ = (item.want_tensors, item.kind, item.debug)
        replies.append(ReplyItem(buffers=1))
        out.append(bytes(owned[0]))
    chunks = encode_frame(BatchReply(1, replies, len(replies)), out)
    reply, got = decode_frame(b"".join(chunks)[4:], FROM_WORKER)
    assert isinstance(reply, BatchReply)
    return decode_outcomes(reply, len(requests), got)


def _requests(n: int) -> list[InferenceRequest]:
    return [
        InferenceRequest(api="tiny", version=None, request_id=f"{i:016x}", body=b"[[1, 2, 3, 4]]")
        for i in range(n)
    ]


def _header_bytes(n: int) -> tuple[int, int]:
    """(before, msgspec) size of the batch header for n requests."""
    requests = _requests(n)
    old = [old_encode_request(r) for r in requests]
    old_frame = old_encode_frame({"op": "batch", "id": 1, "items": [i for i, _ in old]}, [])
    new_frame = encode_frame(Batch(1, [encode_request(r)[0] for r in requests]), [])
    return len(old_frame[1]), len(new_frame[1])


def _per_call_us(fn: Callable[[list[InferenceRequest]], Any], requests: list[Any]) -> float:
    calls = max(20, 400 // len(requests))
    start = time.perf_counter()
    for _ in range(calls):
        fn(requests)
    return (time.perf_counter() - start) / calls * 1e6


def _best_us(n: int, seconds: float) -> tuple[float, float]:
    """(before, msgspec): the best of many short rounds, the two interleaved, so a
    busy machine slows both alike and the minimum is the undisturbed cost."""
    requests = _requests(n)
    for fn in (old_round_trip, new_round_trip):
        assert [o.body for o in fn(requests)] == [r.body for r in requests]
    old = new = float("inf")
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        old = min(old, _per_call_us(old_round_trip, requests))
        new = min(new, _per_call_us(new_round_trip, requests))
    return old, new


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

    from kiln.sandbox.policy import SandboxPolicy, base_env
    from kiln.serving.replica import Replica
    from kiln.serving.types import InferenceRequest, Tensor, WorkerSpec

    data = np.random.default_rng(0).random((rows, features), dtype=np.float32)
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    started = time.perf_counter()
    for _ in range(n):
        session.run(None, {"x": data})
    in_process = (time.perf_counter() - started) / n * 1e6

    def launch(argv: list[str], fds: tuple[int, ...]) -> Any:
        policy = SandboxPolicy(enabled=False, home=model.parent)
        return policy.launch(argv, base_env(), cwd=str(model.parent), pass_fds=fds)

    replica = Replica(
        WorkerSpec(api="ipc", version=None, runtime="onnx", model_path=str(model)),
        launch=launch,
        log_line=lambda line: None,
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


def process_table(n_calls: int) -> None:
    """A real worker process: `Replica.submit_batch` round trips against the in-process call."""
    print(
        f"{'payload':<22} {'in-process':>11} {'JSON body':>10} {'raw tensors':>12} "
        f"{'IPC cost (tensors)':>19}"
    )
    print("-" * 78)
    with tempfile.TemporaryDirectory() as tmp:
        for rows, features in ((1, 16), (64, 256), (256, 1024)):
            model = Path(tmp) / f"id{features}.onnx"
            build_identity(model, features)
            n = n_calls if rows * features < 100_000 else max(50, n_calls // 20)
            r = run(measure(model, features, rows, n))
            label = f"{rows}x{features} FP32 ({r['raw_bytes'] // 1024} KiB)"
            print(
                f"{label:<22} {r['in_process_us']:>9.1f}us {r['json_us']:>8.1f}us "
                f"{r['tensors_us']:>10.1f}us {r['tensors_us'] - r['in_process_us']:>17.1f}us"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per batch size")
    parser.add_argument(
        "--process", action="store_true", help="also: round trips to a real worker process"
    )
    parser.add_argument("--n", type=int, default=2000, help="round trips per --process row")
    args = parser.parse_args()
    print(f"{'batch':>6} {'before us':>10} {'msgspec us':>11} {'speedup':>8} {'header B':>14}")
    for n in (1, 32):
        old, new = _best_us(n, args.seconds)
        old_b, new_b = _header_bytes(n)
        print(f"{n:>6} {old:>10.2f} {new:>11.2f} {old / new:>7.2f}x {old_b:>6} -> {new_b:<6}")
    if args.process:
        print()
        process_table(args.n)


if __name__ == "__main__":
    main()
