"""The worker process: loads one API version and answers requests from the server.

Started as `python -m kiln.serving.worker FD` with one end of a socketpair. It
runs all user code, so a handler that crashes takes down this process only;
the server sees the socket close, fails the requests in flight with 503 and
starts a new worker. The worker exits when the server goes away (socket EOF,
or the parent-death signal on Linux), so no worker outlives its server.

Here: the process and its request loop. Loading the API (environment, model
fetch, what a failed load means) is `worker_load.py`; a traced batch's phase
times and trace ids in the log are `worker_trace.py`.
"""

from __future__ import annotations

import ctypes
import gc
import os
import signal
import socket
import sys
import time
import traceback
from collections.abc import Iterator
from typing import Any

from kiln.compat.shims import install as install_shims
from kiln.errors import InferenceError, KilnError
from kiln.handlers.context import RequestContext
from kiln.handlers.pipeline import BatchLengthMismatch, Pipeline, build_pipeline
from kiln.sandbox.spec import EXIT_OUT_OF_MEMORY
from kiln.serving.encoding import dumps, preview
from kiln.serving.ipc import BlockingChannel
from kiln.serving.messages import (
    TO_WORKER,
    Batch,
    BatchReply,
    Explain,
    Failed,
    Init,
    Ready,
    ReplyItem,
    RequestItem,
    Stop,
    Stream,
    StreamChunk,
    StreamEnd,
    ToWorker,
)
from kiln.serving.payloads import decode_payload, encode_chunk, encode_reply
from kiln.serving.polling import for_limit, usable_cpus
from kiln.serving.tracking import check_tracker_at_load, tracked_values
from kiln.serving.types import WorkerSpec
from kiln.serving.v2_tensors import InferBody
from kiln.serving.wire import split_items, wire_error
from kiln.serving.worker_load import add_site_dirs, load_error, local_model, permanent_load_failure
from kiln.serving.worker_trace import TRACES, BatchClock, trace_note

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL us when the server dies, even while user code is busy."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


def to_kiln_error(
    exc: BaseException, api: str, request_id: str, expose: bool = True, logged: bool = False
) -> KilnError:
    """What the client is told when user code (or its model) fails; the log gets it all.

    A `KilnError` is the handler's own choice of status and message: it goes out as
    raised. Anything else is a 500 whose message is the exception's type and text
    when `expose` (`WorkerSpec.expose_errors`), else its type and the request id
    only: an exception's text is written for the developer and may hold anything
    (a connection string, a path, a token), and on `kiln server` the caller is not
    the developer. The full message and traceback always go to the API's log (this
    process's stderr), under the request id the answer names, unless `logged`.

    The decision is made here, in the worker, because only the worker knows whether
    the exception was a Kiln error; the server decides the policy once, when it
    builds the worker's spec (`InferenceServer.served_api`: shown on `kiln serve`,
    where the developer is the caller; on `kiln server` only with the API's
    `serving.expose_errors: true`), so a hidden message never leaves the worker.
    """
    if isinstance(exc, KilnError):
        return exc
    if not logged:
        log_failure(exc, api, request_id)
    if expose:
        return InferenceError(f"{type(exc).__name__}: {exc}")
    return InferenceError(
        f"{type(exc).__name__} in the API's code (request {request_id}); the message is in "
        f"the API's log (`kiln logs`)"
    )


def log_failure(exc: BaseException, api: str, request_ids: str) -> None:
    """The traceback (or, for an exception returned in an item's slot, its text) to stderr."""
    if exc.__traceback__ is not None:  # raised, not returned in an item's slot
        text = "".join(traceback.format_exception(exc))
    else:
        text = f"{type(exc).__name__}: {exc}\n"
    note = trace_note(request_ids) if TRACES else ""
    _log(f"request {request_ids} failed in API '{api}'{note}:\n{text}".rstrip("\n"))


def _log(text: str) -> None:
    """A line (or lines) for the API's log: stderr, which the server reads."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


Channel = BlockingChannel[ToWorker]


def worker_channel(sock: socket.socket) -> Channel:
    """The worker's end of its socket: it reads the messages the server sends workers."""
    return BlockingChannel(sock, TO_WORKER)


class Worker:
    """The request loop of one worker process."""

    def __init__(self, channel: Channel, spec: WorkerSpec, pipeline: Pipeline) -> None:
        self.channel = channel
        self.spec = spec
        self.pipeline = pipeline
        signature = self.signature = pipeline.signature()
        self.input_names = [i["name"] for i in signature.get("inputs", [])]
        self.output_names = [o["name"] for o in signature.get("outputs", [])]
        self.tensor_api = pipeline.is_tensor
        self.clock = BatchClock(pipeline)  # a traced batch's phase times (worker_trace.py)

    def _context(self, item: RequestItem) -> RequestContext:
        spec = self.spec
        # Positional, in field order: built once per request, keywords cost more.
        return RequestContext(
            item.request_id,
            spec.api,
            spec.version,
            item.protocol,
            item.headers or {},
            item.query or {},
            spec.metadata,
            spec.config,
            None,
            {},
            item.want_tensors,
        )

    def _error(self, exc: BaseException, context: RequestContext, logged: bool = False) -> Any:
        """The answer for a request that failed with `exc`; every failure path comes here.

        Except a MemoryError: that is the worker's memory limit (RLIMIT_DATA where no
        cgroup could be made), not one request's failure, so it ends the worker as the
        kernel's OOM kill would, and the server answers 503 naming compute.mem."""
        if isinstance(exc, MemoryError):
            raise exc
        spec = self.spec
        return to_kiln_error(exc, spec.api, context.request_id, spec.expose_errors, logged)

    def _decode(self, item: RequestItem, owned: list[memoryview]) -> tuple[Any, InferBody | None]:
        return decode_payload(item, owned, self.input_names, self.tensor_api, self.signature)

    def run(self) -> int:
        """Answer frames in order until the server closes the channel or says `Stop`
        (a `Cancel` for a stream already over, or a second `Init`, is ignored)."""
        while True:
            frame = self.channel.recv()
            if frame is None:
                return 0
            message, buffers = frame
            if isinstance(message, Batch):
                self.channel.send(*self.handle_batch(message, buffers))
                self.channel.poll_armed = len(message.items) == 1  # see BlockingChannel
            elif isinstance(message, Explain):
                self.channel.send(*self.handle_explain(message, buffers))
            elif isinstance(message, Stream):
                self.handle_stream(message, buffers)
            elif isinstance(message, Stop):
                return 0

    def handle_batch(
        self, message: Batch, buffers: list[memoryview]
    ) -> tuple[BatchReply, list[Any]]:
        """Answer one batch frame; every item keeps its own outcome.

        A body that does not decode, an exception returned for one item, or an
        answer that cannot be encoded fails that item alone; a `predict_batch`
        that raises fails this batch and no other.
        """
        items = message.items
        received = self.clock.arrived(items)  # 0 unless a request of this batch is traced
        context = self._context
        contexts = [context(item) for item in items]
        stages: list[list[tuple[str, Any]] | None] = [[] if i.debug else None for i in items]
        outcomes: list[Any] = [None] * len(items)
        v2_bodies: list[InferBody | None] = [None] * len(items)
        runnable: list[int] = []
        names, tensor_api, signature = self.input_names, self.tensor_api, self.signature
        for index, (item, owned) in enumerate(zip(items, split_items(items, buffers), strict=True)):
            try:
                outcomes[index], v2_bodies[index] = decode_payload(
                    item, owned, names, tensor_api, signature
                )
                runnable.append(index)
            except Exception as exc:  # noqa: BLE001 - decoding client data
                outcomes[index] = exc
        model_start = model_end = 0
        if runnable:
            if received:
                model_start = time.time_ns()
            try:
                results = self.pipeline.predict_batch(
                    [outcomes[i] for i in runnable],
                    [contexts[i] for i in runnable],
                    [stages[i] for i in runnable],
                )
            except Exception as exc:  # noqa: BLE001 - user code may raise anything
                ids = ", ".join(contexts[i].request_id for i in runnable)
                if isinstance(exc, BatchLengthMismatch):
                    _log(
                        f"API '{self.spec.api}': predict_batch returned {exc.returned} for "
                        f"{exc.expected} requests (request ids {ids}); each of them got a 500"
                    )
                elif not isinstance(exc, KilnError):
                    log_failure(exc, self.spec.api, ids)
                results = [self._error(exc, contexts[i], logged=True) for i in runnable]
            if received:
                model_end = time.time_ns()
            for index, result in zip(runnable, results, strict=True):
                outcomes[index] = result
        replies: list[ReplyItem] = []
        out: list[Any] = []
        answer = self._reply
        for index, outcome in enumerate(outcomes):
            reply, owned = answer(outcome, contexts[index], items[index], v2_bodies[index])
            stage = stages[index]
            if stage is not None:
                reply.debug = [(name, preview(value)) for name, value in stage]
            replies.append(reply)
            out.extend(owned)
        drain = getattr(self.pipeline, "drain_metrics", None)  # torchserve's context.metrics
        if drain is not None and replies and (recorded := drain()):
            replies[0].handler_metrics = recorded
        if received and replies:
            replies[0].timings = self.clock.timings(received, model_start, model_end)
        return BatchReply(message.id, replies, len(items)), out

    def _reply(
        self, outcome: Any, context: RequestContext, item: RequestItem, v2: InferBody | None
    ) -> tuple[ReplyItem, list[Any]]:
        if isinstance(outcome, BaseException):
            return ReplyItem(wire_error(self._error(outcome, context))), []
        try:
            reply, buffers = encode_reply(
                outcome, context, self.spec.response_envelope, item, self.output_names, v2
            )
        except Exception as exc:  # noqa: BLE001 - encoding user values may fail
            return ReplyItem(wire_error(self._error(exc, context))), []
        if self.spec.tracker_type:
            values = tracked_values(
                self.spec.api, outcome, self.spec.tracker_key, self.spec.tracker_type
            )
            if values:
                reply.tracked = values
        return reply, buffers

    def handle_explain(
        self, message: Explain, buffers: list[memoryview]
    ) -> tuple[BatchReply, list[Any]]:
        item = message.items[0]
        context = self._context(item)
        try:
            payload, v2 = self._decode(item, buffers)
            result = self.pipeline.explain(payload, context)
            reply, out = self._reply(result, context, item, v2)
        except Exception as exc:  # noqa: BLE001 - user code
            reply, out = self._reply(exc, context, item, None)
        return BatchReply(message.id, [reply], 1), out

    def handle_stream(self, message: Stream, buffers: list[memoryview]) -> None:
        """Send each item the handler yields as its own frame, as soon as it exists.

        Between items the worker looks for a `cancel` from the server (the client
        went away) and closes the generator, so user code stops working for nobody.
        """
        stream_id = message.id
        item = message.items[0]
        context = self._context(item)
        chunks: Iterator[Any] | None = None
        try:
            chunks = self.pipeline.stream(self._decode(item, buffers)[0], context)
            for value in chunks:
                data, content_type = encode_chunk(value)
                self.channel.send(StreamChunk(stream_id, content_type), [data])
                if self.channel.cancelled(stream_id):
                    break
            self.channel.send(StreamEnd(stream_id, context.status or 200))
        except Exception as exc:  # noqa: BLE001 - user code
            error = self._error(exc, context)
            self.channel.send(StreamEnd(stream_id, error.status, wire_error(error)))
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()


def serve(channel: Channel) -> int:
    first = channel.recv()
    if first is None or not isinstance(first[0], Init):
        return 2
    spec = first[0].spec
    cpus = usable_cpus()  # the machine's share, before this worker is pinned to its own
    if spec.cpus and hasattr(os, "sched_setaffinity"):
        try:
            os.sched_setaffinity(0, spec.cpus)
        except OSError:
            pass  # a container may not allow it; threads still follow compute.cpu
    if spec.python_path and spec.python_path not in sys.path:
        sys.path.insert(0, spec.python_path)
    add_site_dirs(spec.site_dirs)
    install_shims()  # `from hub import ...` etc., unless a real package has the name
    started = time.monotonic()
    fetched = False
    try:
        spec = local_model(spec)
        fetched = True
        pipeline = build_pipeline(spec)
        signature = pipeline.signature()
        dumps(signature)
        check_tracker_at_load(spec, pipeline, signature)
    except BaseException as exc:  # noqa: BLE001 - loading user code may raise anything
        if not isinstance(exc, KilnError | MemoryError):
            traceback.print_exc()
        permanent = fetched and permanent_load_failure(exc, spec)
        channel.send(Failed(load_error(exc), permanent))
        return 1
    # The model and user code live as long as the worker: keep them out of GC scans.
    gc.collect()
    gc.freeze()
    load_s = round(time.monotonic() - started, 3)
    channel.send(Ready(os.getpid(), signature, pipeline.can_explain, load_s))
    channel.poll = for_limit(spec.poll_us, cpus)
    return Worker(channel, spec, pipeline).run()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    _die_with_parent()
    # Ctrl-C and systemd's SIGTERM reach the whole process group (or every process of
    # the unit): the server decides when we stop. It drains our requests, then closes
    # the channel (we exit on EOF) and SIGKILLs us only past its grace period.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    ends = worker_channel(socket.socket(fileno=int(argv[0])))
    try:
        return serve(ends)
    except MemoryError:
        sys.stderr.write("kiln worker: out of memory (compute.mem); exiting\n")
        return EXIT_OUT_OF_MEMORY
    finally:
        ends.close()


if __name__ == "__main__":
    sys.exit(main())
