"""The server <-> worker messages over a real socketpair (no HTTP).

Every message kind round-trips through the real framing; a worker that sends
garbage, an unknown kind or a reply that does not fit its batch costs that worker
(restarted, its request answered 503), never the server; and the two-letter dict
keys the messages replaced are gone from the code that speaks the protocol.
"""

from __future__ import annotations

import ast
import asyncio
import socket
import struct
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest

from kiln.errors import Unavailable
from kiln.sandbox.policy import SandboxPolicy, base_env
from kiln.serving import messages as m
from kiln.serving.ipc import BlockingChannel, FrameError, decode_frame, encode_frame, read_frame
from kiln.serving.replica import LoadFailed, Replica
from kiln.serving.types import InferenceRequest, WorkerSpec

SPEC = WorkerSpec(api="echo", version="v1", runtime="python", cpus=[0], config={"k": [1, 2]})
ITEM = m.RequestItem(
    "req-1",
    kind="tensors",
    buffers=1,
    protocol="v2",
    debug=True,
    want_tensors=True,
    outputs=["y"],
    headers={"x-a": "b"},
    query={"q": "1"},
    tensors=[m.TensorDesc("x", "FP32", [1, 2]), m.TensorDesc("s", "BYTES", [1], [b"hi"])],
    parts=[m.PartDesc("data", "text/plain", "a.txt")],
)
ERROR = m.WireError("InvalidInput", "bad input", 400)

# (message, buffers): one of every kind, with every optional field set somewhere.
CASES: list[tuple[Any, list[bytes]]] = [
    (m.Init(SPEC), []),
    (m.Batch(1, [ITEM, m.RequestItem("req-2")]), [b"\x00" * 8, b"{}"]),
    (m.Explain(2, [m.RequestItem("req-3", kind="raw", content_type="text/plain")]), [b"hi"]),
    (m.Stream(3, [m.RequestItem("req-4", kind="v2json")]), [b'{"inputs": []}']),
    (m.Cancel(3), []),
    (m.Stop(), []),
    (m.Ready(1234, {"inputs": [{"name": "x"}]}, True, 0.25), []),
    (m.Failed("SyntaxError in h.py, line 2: invalid syntax", True), []),
    (
        m.BatchReply(
            1,
            [
                m.ReplyItem(
                    buffers=1,
                    content_type="text/plain",
                    status=201,
                    headers={"x-b": "c"},
                    tracked=["cat", 0.5],
                    debug=[("predict", "[1, 2]")],
                ),
                m.ReplyItem(tensors=[m.TensorDesc("y", "INT64", [1])], buffers=1),
                m.ReplyItem(ERROR),
            ],
            batch_size=3,
        ),
        [b"ok", b"\x01" * 8],
    ),
    (m.StreamChunk(3, "text/plain; charset=utf-8"), [b"tok"]),
    (m.StreamEnd(3), []),
    (m.StreamEnd(4, 400, ERROR), []),
    (m.ClaimBatch(), []),
    (m.AckBatch(0.5), [b"part bytes"]),
    (m.FailBatch("ValueError: no"), []),
    (m.ClaimCompletion(), []),
    (m.FinishJob("on_job_complete failed"), []),
    (m.FinishJob(), []),
    (m.JobHello(), [b'{"job_spec": {}}']),
    (m.ClaimReply("batch", 3, 30, 10, 2), [b"[1, 2]"]),
    (m.ClaimReply("wait", error="cannot write", dead=True), []),
    (m.CompletionReply(True, False), []),
    (m.FinishReply("succeeded"), []),
]


def _decoder_for(message: Any) -> msgspec.msgpack.Decoder[Any]:
    for union, decoder in (
        (m.ToWorker, m.TO_WORKER),
        (m.FromWorker, m.FROM_WORKER),
        (m.ToLink, m.TO_LINK),
        (m.FromLink, m.FROM_LINK),
    ):
        if isinstance(message, union.__args__):  # type: ignore[attr-defined]
            return decoder
    raise AssertionError(f"{type(message).__name__} is in no direction's union")


def test_the_cases_cover_every_message_kind() -> None:
    tagged = {
        cls
        for cls in vars(m).values()
        if isinstance(cls, type)
        and issubclass(cls, msgspec.Struct)
        and cls.__struct_config__.tag is not None
    }
    assert len(tagged) == 20
    assert tagged == {type(message) for message, _ in CASES}


@pytest.mark.parametrize(("message", "buffers"), CASES, ids=lambda c: type(c).__name__)
def test_every_message_kind_round_trips_over_a_socketpair(message: Any, buffers: list[bytes]):
    decoder = _decoder_for(message)
    left, right = socket.socketpair()
    sender, receiver = BlockingChannel(left, decoder), BlockingChannel(right, decoder)
    try:
        sender.send(message, buffers)
        frame = receiver.recv()
    finally:
        sender.close()
        receiver.close()
    assert frame is not None
    got, got_buffers = frame
    assert type(got) is type(message)
    assert got == message
    assert [bytes(b) for b in got_buffers] == buffers


def test_a_frame_is_compact_on_the_wire() -> None:
    """Messages are arrays (no field names); items are maps of one-letter keys without
    their defaults: a one-item native batch header is a handful of bytes."""
    chunks = encode_frame(m.Batch(7, [m.RequestItem("r1")]), [b"{}"])
    header = chunks[1]
    assert msgspec.msgpack.decode(header) == ["batch", 7, [{"r": "r1"}]]
    assert len(header) == 15
    reply = encode_frame(m.BatchReply(7, [m.ReplyItem(buffers=1)], 1), [b"1"])[1]
    assert msgspec.msgpack.decode(reply) == ["reply", 7, [{"b": 1}], 1]


def test_the_async_reader_reads_what_the_blocking_channel_sends() -> None:
    async def go() -> tuple[Any, list[bytes]]:
        left, right = socket.socketpair()
        channel = BlockingChannel(left, m.TO_WORKER)
        reader, writer = await asyncio.open_connection(sock=right)
        try:
            channel.send(m.StreamChunk(9, "text/plain"), [b"a" * 100_000])
            message, buffers = await read_frame(reader, m.FROM_WORKER)
            return message, [bytes(b) for b in buffers]
        finally:
            writer.close()
            channel.close()

    assert asyncio.run(go()) == (m.StreamChunk(9, "text/plain"), [b"a" * 100_000])


def _body(header: bytes, lengths: list[int], tail: bytes = b"") -> bytes:
    """A frame body (after the total) with a hand-made header and buffer lengths."""
    prefix = struct.pack(f"!II{len(lengths)}I", len(header), len(lengths), *lengths)
    return prefix + header + tail


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b"\x00\x00", "shorter than its header"),
        (_body(b"\xc1", []), "not a valid message"),  # 0xc1: never used in MessagePack
        (_body(msgspec.msgpack.encode(["bogus", 1]), []), "Invalid value 'bogus'"),
        (_body(msgspec.msgpack.encode({"id": 1, "items": [], "n": 1}), []), "Expected `array`"),
        (_body(msgspec.msgpack.encode(["reply", "one", []]), []), "Expected `int`"),
        (_body(msgspec.msgpack.encode(["batch", 1, []]), []), "Invalid value 'batch'"),
        (_body(msgspec.msgpack.encode(["end", 1]), [5]), "do not add up"),
        (struct.pack("!II", 100, 0) + b"\x00", "longer header"),
    ],
)
def test_a_malformed_frame_from_a_worker_is_a_frame_error(body: bytes, says: str) -> None:
    with pytest.raises(FrameError, match=says.replace("(", r"\(")):
        decode_frame(body, m.FROM_WORKER)


# ----- a real Replica talking to a fake worker that breaks the protocol --------------------

FAKE_WORKER = """
import socket, struct, sys
import msgspec
from kiln.serving import messages as m
from kiln.serving.ipc import BlockingChannel, encode_frame
mode = sys.argv[1]
sock = socket.socket(fileno=int(sys.argv[2]))
channel = BlockingChannel(sock, m.TO_WORKER)
channel.recv()  # Init
def raw(header: bytes) -> None:
    body = struct.pack("!II", len(header), 0) + header
    sock.sendall(struct.pack("!I", len(body)) + body)
if mode == "start-garbage":
    raw(b"\\xc1\\xc1")
elif mode == "start-dict":  # the old protocol's ready
    raw(msgspec.msgpack.encode({"op": "ready", "pid": 1}))
else:
    channel.send(m.Ready(1, {}, False, 0.0))
    frame = channel.recv()
    batch = frame[0]
    if mode == "garbage":
        raw(b"\\xc1")
    elif mode == "unknown-kind":
        raw(b"\\x92\\xa5bogus\\x01")
    elif mode == "wrong-count":
        extra = m.ReplyItem(m.WireError("InferenceError", "x", 500))
        channel.send(m.BatchReply(batch.id, [extra, extra], 2))
    elif mode == "server-kind":
        channel.send(m.Batch(batch.id, []))
    elif mode == "good":
        channel.send(m.BatchReply(batch.id, [m.ReplyItem(buffers=1)], 1), [b'"pong"'])
channel.recv()  # wait for the server to close or kill us
"""


def _replica(tmp_path: Path, mode: str, logged: list[str]) -> Replica:
    def launch(argv: list[str], fds: tuple[int, ...]) -> Any:
        fake = [sys.executable, "-c", FAKE_WORKER, mode, argv[-1]]
        policy = SandboxPolicy(enabled=False, home=tmp_path)
        return policy.launch(fake, base_env(), cwd=str(tmp_path), pass_fds=fds)

    return Replica(SPEC, launch=launch, log_line=logged.append)


def _request() -> InferenceRequest:
    return InferenceRequest(api="echo", version="v1", request_id="r1", body=b'"ping"')


def test_a_well_behaved_fake_worker_answers(tmp_path: Path) -> None:
    """The harness itself works: the same fake worker, speaking the protocol, is answered."""

    async def go() -> bytes:
        replica = _replica(tmp_path, "good", [])
        await replica.start(timeout=30)
        try:
            (outcome,) = await replica.submit_batch([_request()], timeout=30)
            assert not isinstance(outcome, BaseException)
            return outcome.body
        finally:
            await replica.stop(grace=2)

    assert asyncio.run(go()) == b'"pong"'


@pytest.mark.parametrize("mode", ["garbage", "unknown-kind", "wrong-count", "server-kind"])
def test_a_malformed_reply_costs_the_worker_not_the_server(tmp_path: Path, mode: str) -> None:
    logged: list[str] = []

    async def go() -> tuple[BaseException | None, str | None, bool]:
        replica = _replica(tmp_path, mode, logged)
        await replica.start(timeout=30)
        future = replica.send_batch([_request()], timeout=30)
        try:
            await asyncio.wait_for(future, 20)
            error = None
        except Exception as exc:  # noqa: BLE001 - the outcome under test
            error = exc
        await asyncio.wait_for(replica.exited.wait(), 20)
        alive = replica._process is not None and replica._process.returncode is None
        return error, replica.exit_reason, alive

    error, reason, alive = asyncio.run(go())
    assert isinstance(error, Unavailable) and error.status == 503
    assert "retry shortly" in error.message
    assert reason == "sent a malformed message"
    assert not alive
    assert any("sent a malformed frame" in line for line in logged), logged


@pytest.mark.parametrize("mode", ["start-garbage", "start-dict"])
def test_a_malformed_answer_to_init_is_a_load_failure(tmp_path: Path, mode: str) -> None:
    async def go() -> LoadFailed:
        replica = _replica(tmp_path, mode, [])
        with pytest.raises(LoadFailed) as caught:
            await replica.start(timeout=30)
        return caught.value

    failure = asyncio.run(go())
    assert "malformed frame" in str(failure)
    assert failure.permanent is False


# ----- no two-letter dict keys left in the code that speaks the protocol -------------------

PROTOCOL_FILES = [
    "serving/ipc.py",
    "serving/messages.py",
    "serving/wire.py",
    "serving/replica.py",
    "serving/replica_traffic.py",
    "serving/worker.py",
    "serving/payloads.py",
    "batch/link.py",
    "batch/worker.py",
]


def _short_keys(tree: ast.AST) -> list[str]:
    found: list[str] = []

    def short(node: ast.AST | None) -> bool:
        return (
            isinstance(node, ast.Constant) and isinstance(node.value, str) and len(node.value) <= 2
        )

    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            found += [f"{{{k.value!r}: ...}}" for k in node.keys if short(k)]  # type: ignore[union-attr]
        elif isinstance(node, ast.Subscript) and short(node.slice):
            found.append(f"[{node.slice.value!r}]")  # type: ignore[attr-defined]
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("get", "pop", "setdefault")
            and node.args
            and short(node.args[0])
        ):
            found.append(f".{node.func.attr}({node.args[0].value!r})")  # type: ignore[attr-defined]
    return found


@pytest.mark.parametrize("relative", PROTOCOL_FILES)
def test_no_two_letter_dict_key_is_left_in_the_protocol_code(relative: str) -> None:
    path = Path(__file__).parent.parent / "src" / "kiln" / relative
    # payloads.py builds the V2 response body, whose "id" is the Open Inference Protocol's.
    allowed = ["['id']"] if relative == "serving/payloads.py" else []
    assert _short_keys(ast.parse(path.read_text())) == allowed


def test_the_key_check_finds_the_old_style() -> None:
    old = 'h = {"op": "batch", "id": 1}\nx = item["nb"]\ny = header.get("ct")\n'
    assert _short_keys(ast.parse(old)) == ["{'op': ...}", "{'id': ...}", "['nb']", ".get('ct')"]
