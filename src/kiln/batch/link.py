"""The server's end of one batch worker's channel: the queue, answered in a thread.

A worker (`kiln.batch.worker`) never opens the state store; it asks its
`QueueLink` over a socketpair (see the worker's docstring for the operations).
Each link is one daemon thread that reads a request, makes the same store call
the worker used to make (claim, acknowledge + claim in one transaction, fail,
claim and finish on_job_complete) and answers; it never touches the event loop,
so the per-batch cost is one socket round trip on top of the store's commit.

The link also holds what its worker holds, and keeps it: while a batch (or the
right to run on_job_complete) is out, and nothing else arrives, it extends the
lease every third of the visibility timeout. It stops when the channel closes
(the worker exited or was killed), so a dead worker's batch is redelivered after
the visibility timeout, exactly as when the worker ran its own heartbeat.

A remote output (s3://, gs://) is written here, from the bytes the worker sends
with its acknowledgement, before the batch is acknowledged; a write that fails
counts as a failed attempt of the batch (redelivered, then dead-lettered).
"""

from __future__ import annotations

import select
import socket
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import orjson

from kiln.batch.output import OutputSink
from kiln.control.store import Store
from kiln.control.store.jobs import Claim, QueuedBatch
from kiln.serving.ipc import BlockingChannel
from kiln.serving.messages import (
    TO_LINK,
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

Channel = BlockingChannel[ToLink]


class QueueLink(threading.Thread):
    """Answers one worker's queue operations for one job, until its channel closes."""

    def __init__(
        self,
        store: Store,
        job_id: str,
        job: dict[str, Any],
        sock: socket.socket,
        lease_s: float,
        *,
        sink: OutputSink | None = None,
        log: Callable[[str], None] | None = None,
        name: str = "batch-link",
    ) -> None:
        super().__init__(daemon=True, name=name)
        self.store, self.job_id, self.lease_s = store, job_id, lease_s
        self.sock = sock
        self.sink = sink if sink is not None and sink.remote else None
        self.log = log
        self._hello = orjson.dumps(job)
        self.held: QueuedBatch | None = None  # the batch our worker runs now
        self.completing = False  # our worker runs on_job_complete
        self._beat_at = 0.0

    def close(self) -> None:
        """Wake the thread and end it (the socket itself is closed by the thread)."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    # ---- the thread ---------------------------------------------------------------

    def run(self) -> None:
        channel = BlockingChannel(self.sock, TO_LINK)
        try:
            channel.send(JobHello(), [self._hello])
            while (frame := self._next(channel)) is not None:
                reply, out = self._answer(*frame)
                channel.send(reply, out)
        except OSError:
            pass  # the worker is gone (a malformed frame is a FrameError: logged below)
        except Exception as exc:  # noqa: BLE001 - the store failed: the worker restarts
            if self.log is not None:
                trace = "".join(traceback.format_exception(exc)).rstrip()
                self.log(f"the queue link failed; the worker will be restarted:\n{trace}")
        finally:
            self.held, self.completing = None, False
            channel.close()

    def _next(self, channel: Channel) -> tuple[ToLink, list[memoryview]] | None:
        """The worker's next request; extends what it holds while waiting for it."""
        while True:
            wait = None
            if self.held is not None or self.completing:
                wait = self._beat_at + self.lease_s / 3 - time.monotonic()
                if wait <= 0:
                    self._extend()
                    continue
            if select.select([self.sock], [], [], wait)[0]:
                return channel.recv()

    def _extend(self) -> None:
        self._beat_at = time.monotonic()
        try:
            if self.held is not None:
                self.store.extend_lease(self.job_id, self.held, self.lease_s)
            elif self.completing:
                self.store.extend_completion(self.job_id, self.lease_s)
        except Exception:  # noqa: BLE001 - a missed beat only risks a redelivery
            pass

    def _answer(self, message: ToLink, buffers: list[memoryview]) -> tuple[FromLink, list[bytes]]:
        store, job_id = self.store, self.job_id
        if isinstance(message, ClaimBatch):
            return self._claim(store.claim_batch(job_id))
        if isinstance(message, AckBatch):
            batch = self._take()
            if batch is None:
                return self._claim(store.claim_batch(job_id))
            if self.sink is not None and buffers:
                try:
                    self.write_output(batch, buffers[0])
                except Exception as exc:  # noqa: BLE001 - storage fails in many ways
                    error = f"cannot write the output to {self.sink.name(batch.idx)}: {exc}"
                    dead = store.fail_batch(job_id, batch, error)
                    reply, out = self._claim(store.claim_batch(job_id))
                    reply.error, reply.dead = error, dead
                    return reply, out
            return self._claim(store.ack_batch(job_id, batch, message.seconds))
        if isinstance(message, FailBatch):
            batch = self._take()
            dead = batch is not None and store.fail_batch(job_id, batch, message.error)
            reply, out = self._claim(store.claim_batch(job_id))
            reply.dead = dead
            return reply, out
        if isinstance(message, ClaimCompletion):
            if store.claim_completion(job_id, self.lease_s):
                self.completing, self._beat_at = True, time.monotonic()
                return CompletionReply(won=True, done=False), []
            job = store.get_job(job_id)
            done = job is None or not job.active or job.completion == "done"
            return CompletionReply(won=False, done=done), []
        assert isinstance(message, FinishJob)  # the decoder admits no other kind
        self.completing = False
        return FinishReply(store.finish_job(job_id, error=message.error)), []

    def write_output(self, batch: QueuedBatch, data: bytes | memoryview) -> None:
        """Write a batch's output while keeping its lease: a remote write (S3, GCS) can take
        longer than what is left of the lease, and a lapsed lease would hand the batch to
        another worker mid-write (a redelivery that counts towards the dead letter)."""
        assert self.sink is not None
        done = threading.Event()

        def beat() -> None:
            while not done.wait(self.lease_s / 3):
                try:
                    self.store.extend_lease(self.job_id, batch, self.lease_s)
                except Exception:  # noqa: BLE001 - a missed beat only risks a redelivery
                    pass

        try:
            self.store.extend_lease(self.job_id, batch, self.lease_s)
        except Exception:  # noqa: BLE001 - as above
            pass
        keeper = threading.Thread(target=beat, daemon=True, name="batch-link-lease")
        keeper.start()
        try:
            self.sink.write(batch.idx, data)
        finally:
            done.set()
            keeper.join()

    def _take(self) -> QueuedBatch | None:
        batch, self.held = self.held, None
        return batch

    def _claim(self, claim: Claim | None) -> tuple[ClaimReply, list[bytes]]:
        if claim is None or claim.state != "batch" or claim.batch is None:
            return ClaimReply(claim.state if claim is not None else "wait"), []
        batch = claim.batch
        self.held, self._beat_at = batch, time.monotonic()
        reply = ClaimReply(
            "batch", batch.idx, batch.item_start, batch.item_count, batch.receive_count
        )
        return reply, [batch.payload]
