"""The checkpointer's two private threads: the sender and the durability watcher.

* The **sender** takes snapshots in step order, hands each to the transport, and frees the
  staging buffer as soon as the daemon ACCEPTED it (or refused it). A busy daemon with
  ``fail_if_busy`` set marks the save skipped (its BUSY reason only: gRPC's own
  RESOURCE_EXHAUSTED, ``GrpcLimitError``, fails the save, since sending it again fails
  the same way); a daemon that cannot open our shared memory
  makes the sender switch to streaming for good (``fallback``), with one warning. A
  ``/dev/shm`` without room for a new staging segment (``SharedMemoryFullError``, raised
  on the trainer thread by the pool's ``allocate``, which the worker wraps) switches too:
  that save is staged in process memory instead, with one warning, but only until
  ``/dev/shm`` has room again (``ShmRoom``: before each save, ``reconsider`` tries a
  staging segment once the room is there, and every ``RETRY_EVERY_SAVES``-th save), since
  streaming is several times slower for a big state and a transiently full ``/dev/shm``
  must not cost the rest of a multi-day run. Each buffer goes over a transport that can
  send it (``SaveTransport.accepts``), and the pool closes the other transport's buffers
  as they come back.
* The **watcher** follows accepted saves in order with ``WaitSave`` until each is DURABLE
  or FAILED, so handles resolve without the trainer polling and failures are logged as
  they happen.

Neither retries on its own: a daemon that restarts or stalls is waited for inside each
``Connection`` call (up to ``reconnect_timeout_s``; ``retry.py``), so an error reaching
these threads is final for that save.

Neither thread ever raises into the trainer: outcomes land on the ``SaveHandle`` and in
the ``ckptd.client`` logger.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

from ckptd.protos.v1 import pb

from .errors import (
    CheckpointNotFoundError,
    CkptdClientError,
    DaemonBusyError,
    RequestCancelledError,
    SaveFailedError,
    SharedMemoryFullError,
    SharedMemoryRefusedError,
)
from .grpc_transport import Connection
from .handle import SaveHandle
from .shm import ShmRoom
from .staging import Layout, StagingBuffer, StagingPool, buffer_bytes
from .transport import SaveTransport

logger = logging.getLogger("ckptd.client")

# WaitSave long-poll length: short enough for the watcher to notice close() promptly.
WATCH_POLL_S = 2.0
# However little room /dev/shm had when a staging segment did not fit, every this many saves
# after it try one again (the room may not be inspectable, or the state may have shrunk).
RETRY_EVERY_SAVES = 8


@dataclass(frozen=True)
class SaveJob:
    """One snapshot waiting for the sender."""

    handle: SaveHandle
    header: pb.SaveHeader
    buffer: StagingBuffer
    layout: Layout


class SaveWorker:
    """Owns the sender and watcher threads of one checkpointer."""

    def __init__(
        self,
        connection: Connection,
        transport: SaveTransport,
        pool: StagingPool,
        *,
        fallback: Callable[[], SaveTransport] | None = None,
    ) -> None:
        self.connection = connection
        self.transport = transport
        self.pool = pool
        self._fallback = fallback
        self._stream: SaveTransport | None = None  # the fallback, once made
        # Shared memory to go back to after a full /dev/shm (None: no fallback, or the
        # daemon refused it: streamed for good).
        self._shm = transport if fallback is not None else None
        self._room = ShmRoom("save", RETRY_EVERY_SAVES)  # trainer thread only
        self._switch = threading.Lock()  # the trainer's allocate and the sender both switch
        pool.allocate = self._allocate
        pool.usable = self._usable
        self._jobs: queue.Queue[SaveJob | None] = queue.Queue()
        self._accepted: queue.Queue[SaveHandle | None] = queue.Queue()
        self._stopping = threading.Event()
        self._sender = threading.Thread(target=self._send_loop, name="ckptd-sender", daemon=True)
        self._watcher = threading.Thread(target=self._watch_loop, name="ckptd-watcher", daemon=True)
        self._sender.start()
        self._watcher.start()

    def submit(self, job: SaveJob) -> None:
        self._jobs.put(job)

    def finish(self, timeout_s: float) -> None:
        """Hands over every queued save (up to ``timeout_s``), then tells both threads to
        stop. Call ``join`` after closing the connection, which aborts calls in flight.

        Saves still not handed over after the timeout fail with ``RequestCancelledError``;
        accepted saves whose durability was not yet confirmed fail the same way on the
        client side only — the daemon still holds and commits them.
        """
        self._jobs.put(None)
        self._sender.join(timeout_s)
        self._stopping.set()
        self._accepted.put(None)
        self.transport.cancel()

    def join(self) -> None:
        """Waits for both threads (they end promptly once the connection is closed)."""
        self._sender.join()
        self._watcher.join()

    # Sender.

    def _send_loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            release = _Release(self.pool, job.buffer)
            try:
                self._deliver(job, release)
            except Exception as exc:  # never let the thread die silently
                logger.exception("unexpected error while saving step %d", job.handle.step)
                job.handle._set_failed(
                    CkptdClientError(f"step {job.handle.step}: unexpected client error: {exc!r}")
                )
            finally:
                release()

    def _deliver(self, job: SaveJob, release: Callable[[], None]) -> None:
        handle = job.handle
        while True:
            if self._stopping.is_set():
                self._fail(
                    handle,
                    RequestCancelledError(
                        f"checkpointer closed before step {handle.step} was handed over"
                    ),
                )
                return
            transport = self._carrier(job.buffer)
            try:
                status = transport.send(job.header, job.buffer, job.layout)
            except DaemonBusyError as exc:
                handle._set_skipped(f"daemon busy: {exc.details}")
                logger.warning("skipped checkpoint step %d: %s", handle.step, exc)
                return
            except SharedMemoryRefusedError as exc:
                if not self._stream_from_now(exc, job.buffer.capacity):
                    self._fail(handle, exc)
                    return
                continue
            except CkptdClientError as exc:
                self._fail(handle, exc)
                return
            if status.state == pb.SAVE_STATE_FAILED:
                self._fail(
                    handle,
                    SaveFailedError(f"step {handle.step} failed in the daemon: {status.error}"),
                )
                return
            break
        # The buffer is free before the save is ACCEPTED: whoever waits for the handle
        # (``wait()``, the next ``save()``) finds it free, not still held by this thread.
        release()
        handle._set_accepted()
        self._accepted.put(handle)

    def reconsider(self, nbytes: int) -> None:
        """Trainer thread, before each save of ``nbytes``: saves that stream since
        ``/dev/shm`` was full go back to shared memory when ``ShmRoom`` finds it worth
        trying and a staging segment for them fits (it becomes the pool's buffer)."""
        shm = self._shm
        if shm is None or self.transport is shm or not self._room.worth_trying():
            return
        limit = self.pool.max_total_bytes
        if limit is not None and buffer_bytes(nbytes) > limit:
            return  # ``acquire`` refuses this save anyway: no segment over max_staging_bytes
        try:
            buffer = shm.allocate(buffer_bytes(nbytes))
        except SharedMemoryFullError as exc:
            self._stream_from_now(exc, buffer_bytes(nbytes))
            return
        with self._switch:
            if self._shm is not shm:  # the daemon refused shared memory meanwhile
                buffer.close()
                return
            self.transport = shm
        self.pool.restock(buffer)  # else (every buffer busy) the pool allocates from shm
        if self._room.served():
            logger.info("saves go through shared memory again")

    def _allocate(self, capacity: int) -> StagingBuffer:
        """The pool's ``allocate`` (trainer thread): a new buffer from the transport in use,
        switching to streaming first when shared memory has no room for it."""
        transport = self.transport
        try:
            return transport.allocate(capacity)
        except SharedMemoryFullError as exc:
            if not self._stream_from_now(exc, capacity):
                raise
        return self.transport.allocate(capacity)

    def _usable(self, buffer: StagingBuffer) -> bool:
        """The pool's ``usable``: a buffer the transport of later saves can send."""
        return self.transport.accepts(buffer)

    def _carrier(self, buffer: StagingBuffer) -> SaveTransport:
        """The transport that sends ``buffer``: shared memory for a shared-memory buffer
        while the daemon reads our segments (a full ``/dev/shm`` stops new segments, not
        the ones the pool holds), else the one in use, unless ``buffer`` was staged in
        process memory while saves streamed (those stream still)."""
        shm = self._shm
        if shm is not None and shm.accepts(buffer):
            return shm
        transport = self.transport
        if transport.accepts(buffer) or self._stream is None:
            return transport
        return self._stream

    def _stream_from_now(self, exc: SharedMemoryRefusedError, nbytes: int) -> bool:
        """Streams later saves after shared memory failed with ``exc`` for ``nbytes``: for
        good when the daemon cannot open our segments, until ``/dev/shm`` has room again
        when it was full. False when there is no fallback to switch to."""
        with self._switch:
            if self._fallback is None:
                return False
            if self._stream is None:
                self._stream = self._fallback()
            self.transport = self._stream
            if not isinstance(exc, SharedMemoryFullError):
                warn, self._shm = self._shm is not None, None
                if warn:
                    logger.warning("the daemon cannot read this process's shared memory "
                                   "(%s); streaming checkpoints over gRPC instead", exc.details)
                return True
            if self._shm is None:
                return True  # streaming for good already
            if self._room.refused(nbytes):
                logger.warning(
                    "shared memory is full (%s); streaming checkpoints over gRPC instead; %s; "
                    "see the README's 'Sizing /dev/shm'", exc.details, self._room.later())
            else:
                logger.debug("shared memory is still full, streamed: %s", exc.details)
            return True

    # Watcher.

    def _watch_loop(self) -> None:
        while (handle := self._accepted.get()) is not None:
            try:
                self._watch(handle)
            except Exception as exc:
                logger.exception("unexpected error while waiting for step %d", handle.step)
                handle._set_failed(
                    CkptdClientError(f"step {handle.step}: unexpected client error: {exc!r}")
                )
        self._abandon_watched()

    def _watch(self, handle: SaveHandle) -> None:
        ref = pb.StepRef(run=handle.run, rank=handle.rank, step=handle.step)
        while not self._stopping.is_set():
            try:
                status = self.connection.wait_save(ref, WATCH_POLL_S)
            except CheckpointNotFoundError as exc:
                self._fail(handle, _lost(handle, exc))
                return
            except CkptdClientError as exc:
                if self._stopping.is_set():
                    break  # close() cut the call off: not a failure of the save
                self._fail(handle, exc)
                return
            if status.state == pb.SAVE_STATE_DURABLE:
                handle._set_durable()
                return
            if status.state == pb.SAVE_STATE_FAILED:
                self._fail(
                    handle,
                    SaveFailedError(f"step {handle.step} failed in the daemon: {status.error}"),
                )
                return
        self._abandon(handle)

    def _abandon_watched(self) -> None:
        while True:
            try:
                handle = self._accepted.get_nowait()
            except queue.Empty:
                return
            if handle is not None:
                self._abandon(handle)

    def _abandon(self, handle: SaveHandle) -> None:
        handle._set_failed(
            RequestCancelledError(
                f"checkpointer closed before step {handle.step} was confirmed durable; "
                "the daemon had accepted it and still commits it"
            )
        )

    @staticmethod
    def _fail(handle: SaveHandle, error: CkptdClientError) -> None:
        handle._set_failed(error)
        logger.warning("checkpoint step %d failed: %s", handle.step, error)


def _lost(handle: SaveHandle, exc: CkptdClientError) -> SaveFailedError:
    error = SaveFailedError(
        f"step {handle.step} was accepted but the daemon no longer knows it (it restarted "
        f"before the step became durable): {exc.details}"
    )
    error.code, error.details = exc.code, exc.details
    return error


class _Release:
    """Returns one save's staging buffer to the pool exactly once: from ``_deliver`` as
    soon as the daemon accepted the save, else when the sender is done with it."""

    def __init__(self, pool: StagingPool, buffer: StagingBuffer) -> None:
        self._pool, self._buffer, self._done = pool, buffer, False

    def __call__(self) -> None:
        if not self._done:
            self._done = True
            self._pool.release(self._buffer)
