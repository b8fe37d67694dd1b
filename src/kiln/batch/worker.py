"""The batch worker process: ask the server for a batch, run it, report it; repeat; then finish.

Started by the server for one job as ``python -m kiln.batch.worker FD``, where FD
is the worker's end of a socketpair (the only descriptor it inherits besides
stdio; see `kiln.batch.workers.spawn_worker`). The worker never opens the state store
and needs no network: everything it asks of the queue goes over that channel, in
`kiln.serving.ipc` frames (typed `kiln.serving.messages`, raw buffers, no pickle), and the
server's `kiln.batch.link.QueueLink` answers with the same store calls the worker
used to make. One request, one answer:

====================  ===================================================  ==================
worker sends          the server does                                      and answers
====================  ===================================================  ==================
(first, unasked)      (reads the job)                                      ``job``: job_spec,
                                                                           plan, output
``claim``             ``claim_batch``                                      a claim
``ack`` s [, bytes]   writes remote output bytes, ``ack_batch`` (+ claim)   the next claim
``fail`` error        ``fail_batch``, then ``claim_batch``                 dead?, next claim
``complete``          ``claim_completion`` (or reads whether it is done)   won?, done?
``finish`` error      ``finish_job``                                       the final status
====================  ===================================================  ==================

A claim is ``state`` ("batch", "wait", "drained", "stop"); a batch comes with its
index, first item, item count and receive count, and its payload (the JSON array
of its items) as the frame's buffer. The server keeps the lease token: the worker
cannot act on a batch it does not hold, nor on another job.

Leases: the server extends the lease of the batch (or of on_job_complete) that a
worker holds, every third of the visibility timeout, for as long as that
worker's channel is open: it knows which batch it handed to which live worker,
so no heartbeat crosses the channel and the worker needs no lock around it. When
the worker dies its channel closes, the extensions stop, and the batch is
redelivered after the visibility timeout, as before.

Output: a local output folder is created by the server and passed in the ``job``
frame; the worker writes its ``part-*`` files there itself (atomically, see
`kiln.batch.output`). For a remote one (s3://, gs://) the worker encodes the
batch's results and sends the bytes with its ``ack``; the server writes them
before it acknowledges.

Exit codes tell the server what happened: 0 done, 2 the predictor failed to load
(the job ends in ``worker error``), 3 out of memory (``out of memory``); 1 when the
server closed the channel. State changes go to stdout as marker lines the server
reads (``MARK`` + state); everything else on stdout/stderr goes to the job's log.
"""

from __future__ import annotations

import signal
import socket
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from kiln.batch.output import OutputSink
from kiln.batch.runner import Runner, load_runner
from kiln.errors import KilnError
from kiln.sandbox.spec import EXIT_OUT_OF_MEMORY as EXIT_OOM
from kiln.serving.ipc import BlockingChannel
from kiln.serving.messages import (
    FROM_LINK,
    AckBatch,
    ClaimBatch,
    ClaimCompletion,
    ClaimReply,
    CompletionReply,
    FailBatch,
    FinishJob,
    FinishReply,
    FromLink,
    JobHello,
    ToLink,
)
from kiln.serving.worker import _die_with_parent

MARK = "\x1ekiln-batch:"
EXIT_LOAD_FAILED = 2
EXIT_SERVER_GONE = 1
_WAIT_S = (0.02, 0.5)  # polling backoff while others hold the last batches


def mark(state: str, detail: str = "") -> None:
    sys.stdout.write(f"{MARK}{state} {detail}".rstrip() + "\n")
    sys.stdout.flush()


def describe(exc: BaseException) -> str:
    if isinstance(exc, KilnError):
        return exc.message
    return f"{type(exc).__name__}: {exc}"


class ServerGone(Exception):
    """The server closed the channel (it stopped the job, or it is shutting down)."""


@dataclass(frozen=True)
class Batch:
    """A batch this worker holds (the server keeps its lease)."""

    idx: int
    item_start: int
    item_count: int
    receive_count: int
    payload: bytes | memoryview


@dataclass(frozen=True)
class Claim:
    state: str  # "batch", "wait", "drained", "stop"
    batch: Batch | None = None


class QueueClient:
    """The worker's end of the channel: each queue operation is one request and one answer."""

    def __init__(self, channel: BlockingChannel[FromLink]) -> None:
        self.channel = channel

    def _recv(self) -> tuple[FromLink, list[memoryview]]:
        frame = self.channel.recv()
        if frame is None:
            raise ServerGone
        return frame

    def _call(
        self, message: ToLink, buffers: Sequence[bytes] = ()
    ) -> tuple[FromLink, list[memoryview]]:
        try:
            self.channel.send(message, buffers)
        except OSError:
            raise ServerGone from None
        return self._recv()

    def hello(self) -> dict[str, Any]:
        """The job, as the server sends it first: job_spec, plan, batch_size, output."""
        message, buffers = self._recv()
        if not isinstance(message, JobHello) or not buffers:
            raise KilnError(f"the server sent {type(message).__name__} instead of the job")
        return orjson.loads(buffers[0])  # type: ignore[no-any-return]

    def _claim(self, message: ToLink, buffers: Sequence[bytes] = ()) -> tuple[Claim, ClaimReply]:
        """Send `message`, whose answer is a claim: (the claim, the reply it came in)."""
        reply, received = self._call(message, buffers)
        if not isinstance(reply, ClaimReply):
            raise KilnError(f"the server answered a claim with {type(reply).__name__}")
        if reply.state != "batch":
            return Claim(reply.state), reply
        batch = Batch(
            reply.index, reply.item_start, reply.item_count, reply.receive_count, received[0]
        )
        return Claim("batch", batch), reply

    def claim(self) -> Claim:
        return self._claim(ClaimBatch())[0]

    def ack(self, seconds: float, output: bytes | None = None) -> tuple[Claim, str | None]:
        """Acknowledge the batch held (with its encoded output when the server writes it).

        Returns the next claim, and the server's error when it could not write the
        output (the batch then counts as failed, as if it had raised).
        """
        claim, reply = self._claim(AckBatch(seconds), [output] if output is not None else [])
        return claim, reply.error

    def fail(self, error: str) -> tuple[Claim, bool]:
        """Report the batch held as failed; (next claim, whether it was dead-lettered)."""
        claim, reply = self._claim(FailBatch(error))
        return claim, reply.dead

    def complete(self) -> tuple[bool, bool]:
        """(this worker runs on_job_complete, the job is already finished)."""
        reply, _ = self._call(ClaimCompletion())
        if not isinstance(reply, CompletionReply):
            raise KilnError(f"the server answered complete with {type(reply).__name__}")
        return reply.won, reply.done

    def finish(self, error: str | None) -> str | None:
        reply, _ = self._call(FinishJob(error))
        if not isinstance(reply, FinishReply):
            raise KilnError(f"the server answered finish with {type(reply).__name__}")
        return reply.status


class BatchWorker:
    def __init__(self, client: QueueClient, job: dict[str, Any]) -> None:
        self.client = client
        self.job_spec: dict[str, Any] = job["job_spec"]
        self.plan: dict[str, Any] = job["plan"]
        self.batch_size: int = job["batch_size"]
        output = job.get("output")
        self.sink = OutputSink(output["folder"], output["format"]) if output else None
        self.runner: Runner | None = None

    def load(self) -> None:
        self.runner = load_runner(self.plan, self.job_spec, self.batch_size)

    def run(self) -> int:
        claim = self.client.claim()
        pause = _WAIT_S[0]
        while True:
            if claim.state == "batch" and claim.batch is not None:
                claim = self._run_batch(claim.batch)
                pause = _WAIT_S[0]
                continue
            if claim.state == "stop":
                return 0
            if claim.state == "drained" and self._complete():
                return 0
            time.sleep(pause)
            pause = min(pause * 2, _WAIT_S[1])
            claim = self.client.claim()

    def _run_batch(self, batch: Batch) -> Claim:
        assert self.runner is not None
        started = time.perf_counter()
        output = None
        try:
            items = orjson.loads(batch.payload)
            results = self.runner.run(items, str(batch.idx))
            if self.sink is not None:
                if results is None or len(results) != len(items):
                    got = "nothing" if results is None else f"{len(results)} results"
                    raise KilnError(
                        f"the job has an output, so predict must return a list with one "
                        f"result per item ({len(items)}); it returned {got}"
                    )
                output = self.sink.encode(batch.item_start, results)
                if not self.sink.remote:  # ours to write; a remote one the server writes
                    self.sink.write(batch.idx, output)
                    output = None
        except MemoryError:
            raise
        except BaseException as exc:  # noqa: BLE001 - user code may raise anything
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise
            error = describe(exc)
            if not isinstance(exc, KilnError):
                trace = "".join(traceback.format_exception(exc))
                sys.stderr.write(
                    f"batch {batch.idx} failed (receive {batch.receive_count}):\n{trace}"
                )
                sys.stderr.flush()
            else:
                sys.stderr.write(f"batch {batch.idx} failed: {error}\n")
            return self._fail(batch, error)
        claim, write_error = self.client.ack(time.perf_counter() - started, output)
        if write_error is not None:
            sys.stderr.write(f"batch {batch.idx} failed: {write_error}\n")
            sys.stderr.flush()
        return claim

    def _fail(self, batch: Batch, error: str) -> Claim:
        claim, dead = self.client.fail(error)
        if dead:
            sys.stderr.write(f"batch {batch.idx} moved to the dead-letter set\n")
        sys.stderr.flush()
        return claim

    def _complete(self) -> bool:
        """Try to run on_job_complete; True when the job is finished (by us or another)."""
        won, done = self.client.complete()
        if not won:
            return done
        assert self.runner is not None
        error = None
        try:
            self.runner.on_job_complete()
        except Exception as exc:  # noqa: BLE001 - user code
            traceback.print_exc()
            error = f"on_job_complete failed: {describe(exc)}"
        status = self.client.finish(error)
        mark("finished", status or "")
        return True


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    _die_with_parent()  # in a sandbox, its launcher dies with the server (and takes us)
    # Ctrl-C and systemd's SIGTERM reach every process: the server decides when we stop
    # (it closes our channel), so a job is not cut off before the server has drained.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    channel = BlockingChannel(socket.socket(fileno=int(argv[0])), FROM_LINK)
    mark("initializing")
    try:
        client = QueueClient(channel)
        worker = BatchWorker(client, client.hello())
        worker.load()
    except ServerGone:
        return EXIT_SERVER_GONE  # the server died or stopped the job before we started
    except MemoryError:
        mark("error", "out of memory while loading the predictor")
        return EXIT_OOM
    except BaseException as exc:  # noqa: BLE001 - loading user code may raise anything
        if not isinstance(exc, KilnError):
            traceback.print_exc()
        mark("error", f"the predictor failed to load: {describe(exc)}")
        return EXIT_LOAD_FAILED
    mark("running")
    try:
        return worker.run()
    except ServerGone:
        return EXIT_SERVER_GONE
    except MemoryError:
        mark("error", "out of memory while running a batch")
        return EXIT_OOM
    finally:
        channel.close()


if __name__ == "__main__":
    sys.exit(main())
