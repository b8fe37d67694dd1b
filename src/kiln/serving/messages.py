"""Every message the server and its worker processes exchange, one typed definition per kind.

A frame (`kiln.serving.ipc`) carries one of these as its header and, after it,
the raw buffers the message accounts for (request bodies, tensor memory, a
chunk of a stream). Messages are `msgspec.Struct`s: attributes with readable
names in code, checked by mypy, and a compact wire form: `array_like=True`
encodes a message as a MessagePack array `[tag, field, field, ...]`, so no key
names travel at all; the sparse items of a batch and its reply are maps with
one-letter keys that omit defaults. Decoding validates the whole header (types,
tags, literals) in C before any of it is read. bench/ipc_cost.py measured it against
the msgpack dicts with two-letter keys it replaced (docs/performance.md).

Each direction has its own union, decoded with its own `Decoder`: a worker that
sends a server-bound kind (or anything else) is a malformed frame on the
server's side, never a KeyError in the middle of a reply.

The wire form is positional: adding a field at the end of a struct, with a
default, is compatible; reordering is not. The server and its workers always
run the same installed Kiln, so no version is negotiated.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from kiln.worker_spec import WorkerSpec

# ----- parts of messages (untagged) ----------------------------------------------------


class WireError(msgspec.Struct, array_like=True, frozen=True):
    """A `KilnError` crossing the process boundary; rebuilt by `kiln.errors.error_from_wire`."""

    type: str
    message: str
    status: int


class TensorDesc(msgspec.Struct, array_like=True):
    """One typed tensor. Numeric data is the item's next buffer (raw memory, read back
    with `np.frombuffer`); BYTES elements ride in `values`."""

    name: str
    datatype: str
    shape: list[int]
    values: list[bytes] | None = None


class PartDesc(msgspec.Struct, array_like=True):
    """One multipart part; its data is the item's next buffer."""

    name: str
    content_type: str = ""
    filename: str | None = None


RequestKind = Literal["json", "raw", "parts", "tensors", "v2json"]


# Items are sparse (most fields keep their defaults), so they travel as maps with
# one-letter keys and without the defaults: a native JSON request is `{"r": id}`.
_KEYS = {
    "request_id": "r",
    "kind": "k",
    "buffers": "b",
    "content_type": "c",
    "protocol": "p",
    "debug": "d",
    "want_tensors": "w",
    "outputs": "o",
    "headers": "h",
    "query": "q",
    "tensors": "t",
    "parts": "s",
    "error": "e",
    "status": "x",
    "tracked": "v",
    "trace": "z",
    "timings": "i",
}


class RequestItem(msgspec.Struct, omit_defaults=True, rename=_KEYS):
    """One request of a batch (`kiln.serving.types.InferenceRequest` without the bytes).

    It owns `buffers` consecutive buffers of the frame: the body, one per part, or
    one per numeric tensor.
    """

    request_id: str
    kind: RequestKind = "json"
    buffers: int = 1
    content_type: str = ""
    protocol: str = "native"
    debug: bool = False
    want_tensors: bool = False
    outputs: list[str] | None = None
    headers: dict[str, str] | None = None
    query: dict[str, str] | None = None
    tensors: list[TensorDesc] | None = None
    parts: list[PartDesc] | None = None
    # The request's W3C traceparent when tracing is on (serving/tracing.py): the worker
    # times the batch's phases for the server and tags its log lines with the ids.
    trace: str | None = None


class ReplyItem(msgspec.Struct, omit_defaults=True, rename=_KEYS):
    """The outcome of one request: an answer (`error` is None) or an error.

    An answer owns `buffers` buffers: its body, or one per numeric output tensor
    when it carries `tensors`.
    """

    error: WireError | None = None
    buffers: int = 0
    content_type: str = "application/json"
    status: int = 200
    headers: dict[str, str] | None = None
    tensors: list[TensorDesc] | None = None
    tracked: list[str | float] | None = None  # prediction-monitoring values (tracker:)
    debug: list[tuple[str, str]] | None = None  # (stage, preview) with X-Kiln-Debug
    # [name, kind, value, unit] a TorchServe handler recorded with context.metrics
    handler_metrics: list[tuple[str, str, float, str]] | None = None
    # The batch's phases when a request in it is traced, on the first item only: the
    # worker's wall-clock ns [received, first model call, model done, reply encoded]
    # (serving/tracing.py records them as spans; untraced replies leave the key off).
    timings: list[int] | None = None


# ----- server -> worker ----------------------------------------------------------------


class Init(msgspec.Struct, array_like=True, tag="init"):
    """First frame to a worker: what to load."""

    spec: WorkerSpec


class Work(msgspec.Struct, array_like=True):
    """Requests for the worker to run, in frame order; answered by id."""

    id: int
    items: list[RequestItem]


class Batch(Work, tag="batch"):
    """Run `predict` (or `predict_batch`) over the items; answered with one `BatchReply`."""


class Explain(Work, tag="explain"):
    """Run `explain` on the one item; answered with one `BatchReply`."""


class Stream(Work, tag="stream"):
    """Run the handler's generator on the one item: `StreamChunk`s, then `StreamEnd`."""


class Cancel(msgspec.Struct, array_like=True, tag="cancel"):
    """The client of stream `id` went away: close the generator."""

    id: int


class Stop(msgspec.Struct, array_like=True, tag="stop"):
    """Exit after the frames before this one (closing the socket does the same)."""


# ----- worker -> server ----------------------------------------------------------------


class Ready(msgspec.Struct, array_like=True, tag="ready"):
    """The model is loaded; the worker takes work from now on."""

    pid: int
    signature: dict[str, Any]
    explain: bool
    load_s: float


class Failed(msgspec.Struct, array_like=True, tag="failed"):
    """Loading failed; `permanent` when no retry can succeed (the worker then exits)."""

    error: str
    permanent: bool = False


class BatchReply(msgspec.Struct, array_like=True, tag="reply"):
    """The outcomes of a `Batch` or `Explain`, one per item, in order."""

    id: int
    items: list[ReplyItem]
    batch_size: int = 1  # how many requests shared the model call


class StreamChunk(msgspec.Struct, array_like=True, tag="chunk"):
    """One item a stream's handler yielded; its bytes are the frame's buffer."""

    id: int
    content_type: str


class StreamEnd(msgspec.Struct, array_like=True, tag="end"):
    """The stream is over: normally (`error` None) or with the error that ended it."""

    id: int
    status: int = 200
    error: WireError | None = None


ToWorker = Init | Batch | Explain | Stream | Cancel | Stop
FromWorker = Ready | Failed | BatchReply | StreamChunk | StreamEnd

# ----- batch jobs: worker -> QueueLink (kiln.batch.link) --------------------------------


class ClaimBatch(msgspec.Struct, array_like=True, tag="claim"):
    """Give me the next batch of the job."""


class AckBatch(msgspec.Struct, array_like=True, tag="ack"):
    """The held batch is done (its encoded output as the buffer when the server writes
    it); the answer is the next claim."""

    seconds: float


class FailBatch(msgspec.Struct, array_like=True, tag="fail"):
    """The held batch failed; the answer is the next claim and whether it was dead-lettered."""

    error: str


class ClaimCompletion(msgspec.Struct, array_like=True, tag="complete"):
    """May this worker run on_job_complete?"""


class FinishJob(msgspec.Struct, array_like=True, tag="finish"):
    """on_job_complete ran (or failed with `error`): finish the job."""

    error: str | None = None


# ----- batch jobs: QueueLink -> worker ---------------------------------------------------


class JobHello(msgspec.Struct, array_like=True, tag="job"):
    """First frame to a batch worker; the job (JSON: job_spec, plan, batch_size, output)
    is its buffer."""


class ClaimReply(msgspec.Struct, array_like=True, tag="claimed"):
    """A claim: a batch (its payload is the buffer) or why there is none.

    `error`: the output of the acknowledged batch could not be written (it counts as
    failed); `dead`: the failed batch was dead-lettered.
    """

    state: str  # "batch", "wait", "drained", "stop" (kiln.control.store.jobs.Claim)
    index: int = 0
    item_start: int = 0
    item_count: int = 0
    receive_count: int = 0
    error: str | None = None
    dead: bool = False


class CompletionReply(msgspec.Struct, array_like=True, tag="completion"):
    """Whether this worker runs on_job_complete, and whether the job is already finished."""

    won: bool
    done: bool


class FinishReply(msgspec.Struct, array_like=True, tag="finished"):
    """The job's final status."""

    status: str | None


ToLink = ClaimBatch | AckBatch | FailBatch | ClaimCompletion | FinishJob
FromLink = JobHello | ClaimReply | CompletionReply | FinishReply

Message = ToWorker | FromWorker | ToLink | FromLink

# One decoder per direction: each validates against the kinds that may arrive there.
TO_WORKER: msgspec.msgpack.Decoder[ToWorker] = msgspec.msgpack.Decoder(ToWorker)
FROM_WORKER: msgspec.msgpack.Decoder[FromWorker] = msgspec.msgpack.Decoder(FromWorker)
TO_LINK: msgspec.msgpack.Decoder[ToLink] = msgspec.msgpack.Decoder(ToLink)
FROM_LINK: msgspec.msgpack.Decoder[FromLink] = msgspec.msgpack.Decoder(FromLink)
