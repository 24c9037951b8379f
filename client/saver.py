"""The save half of a ``Checkpointer``: snapshot, hand over, follow to durability.

``Checkpointer.save``, ``guard``, ``wait_snapshot``, ``wait`` and ``close`` delegate here
(the public docstrings stay on ``Checkpointer``). This room owns what one (run, rank)'s
saves share between calls: the staging pool (the client's backpressure), the sender and
watcher threads (``SaveWorker``), the overlapped copier with its guards
(``snapshot="overlap"``), the handles ``wait`` still has to report, and the last step saved
(steps must increase). On the trainer thread ``save`` flattens the state, builds the
header, acquires a staging buffer (or skips: never raises for a busy daemon), copies
(all of it, or with overlap only the guarded leaves) and queues the job; everything after
that runs on the worker's threads.

None of it references the ``Checkpointer``: the finalizer that hands over queued saves of
a checkpointer dropped or left open at exit (``shutdown``) holds only these parts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

from .config import CheckpointerConfig
from .errors import CkptdTimeoutError
from .grpc_transport import Connection
from .handle import SaveHandle, SaveState
from .header import HeaderBuilder
from .overlap import Guard, PendingCopy, SnapshotThread, install_guard, split_leaves
from .policies import check_bits
from .retention import check_metrics
from .staging import StagingPool, plan_layout, snapshot
from .structure import flatten
from .transport import SaveTransport
from .worker import SaveJob, SaveWorker

logger = logging.getLogger("ckptd.client")

__all__ = ["Saver", "shutdown"]


class Saver:
    """One (run, rank)'s saves: staging, the worker threads, overlap and the handles."""

    def __init__(
        self,
        config: CheckpointerConfig,
        connection: Connection,
        transport: SaveTransport,
        headers: HeaderBuilder,
        *,
        fallback: Callable[[], SaveTransport] | None,
    ) -> None:
        self.config = config
        self._connection = connection
        self._headers = headers
        self.pool = StagingPool(
            transport.allocate,
            max_buffers=config.staging_buffers,
            max_total_bytes=config.max_staging_bytes,
        )
        self.worker = SaveWorker(
            connection,
            transport,
            self.pool,
            fallback=fallback,
        )
        self.copier = (
            SnapshotThread(self.worker.submit, self.pool.release)
            if config.snapshot == "overlap"
            else None
        )
        self._guards: list[Guard] = []
        self._warned_unguarded = False
        self._handles: list[SaveHandle] = []
        self.last_step: int | None = None

    def save(
        self,
        step: int,
        state: Any,
        bits: int | None,
        metadata: Mapping[str, str] | None,
        metrics: Mapping[str, float] | None,
    ) -> SaveHandle:
        """See ``Checkpointer.save``."""
        self._check_step(step)
        scores = check_metrics(None if metrics is None else dict(metrics))
        flat = flatten(state)
        bits = check_bits(bits, "bits") or self.config.bits
        header = self._headers.build(step, flat, bits, metadata)
        header.metrics.update(scores)
        layout = plan_layout([leaf.nbytes for leaf in flat.leaves])
        handle = SaveHandle(self._headers.run, self._headers.rank, step)
        skip = self.config.when_busy == "skip"
        self.worker.reconsider(layout.total_bytes)  # back to shared memory once it has room
        buffer = self.pool.acquire(layout.total_bytes, 0.0 if skip else self.config.busy_timeout_s)
        if buffer is None:
            reason = self._busy_reason(skip)
            handle._set_skipped(reason)
            logger.warning("skipped checkpoint step %d: %s", step, reason)
            return handle
        header.fail_if_busy = skip
        job = SaveJob(handle, header, buffer, layout)
        copy_now: list[int] | None = None  # None: every leaf
        deferred: list[int] = []
        versions: list[int] = []
        if self.copier is not None:
            self._warn_if_unguarded()
            buffers = set().union(*(guard.buffer_pointers() for guard in self._guards))
            copy_now, deferred, versions = split_leaves(flat.leaves, buffers)
        try:
            snapshot(flat.leaves, layout, buffer, copy_now)
        except BaseException:
            self.pool.release(buffer)
            raise
        self.last_step = step
        self._track(handle)
        if self.copier is None:
            self.worker.submit(job)
        else:
            self.copier.put(PendingCopy(job, flat.leaves, tuple(deferred), tuple(versions)))
        return handle

    def guard(self, targets: tuple[torch.nn.Module | torch.optim.Optimizer, ...]) -> Guard:
        """See ``Checkpointer.guard``."""
        # The hooks hold the copier, not the checkpointer, so a model outliving it does not
        # keep it (and its threads) alive.
        guard = install_guard(targets, self.copier.wait if self.copier else _nothing_pending)
        self._guards.append(guard)
        return guard

    def wait_snapshot(self, timeout_s: float | None) -> None:
        """See ``Checkpointer.wait_snapshot``."""
        if self.copier is not None:
            self.copier.wait(timeout_s)

    def wait(self, timeout_s: float | None) -> None:
        """See ``Checkpointer.wait``."""
        handles = list(self._handles)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        for handle in handles:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not handle.durable(remaining) and not handle.done():
                pending = [h.step for h in handles if not h.done()]
                raise CkptdTimeoutError(f"steps {pending} were not durable within {timeout_s} s")
        self._handles = [h for h in self._handles if h not in handles]
        for handle in handles:
            if handle.state is SaveState.FAILED:
                error = handle.exception(0)
                assert error is not None
                raise error

    def close(self, timeout_s: float) -> None:
        """``Checkpointer.close``: the guards' hooks removed, then ``shutdown``."""
        for guard in self._guards:
            guard.remove()
        shutdown(self.copier, self.worker, self._connection, self.pool, timeout_s)

    def _warn_if_unguarded(self) -> None:
        if self._warned_unguarded or any(guard.hooks for guard in self._guards):
            return
        self._warned_unguarded = True
        logger.warning(
            "snapshot='overlap' but no optimizer is guarded: call "
            "Checkpointer.guard(model, optimizer), or wait_snapshot() before changing saved "
            "tensors; changes that bypass torch's version counters (fused optimizers, "
            "tensor.data) would otherwise be saved half-updated without an error"
        )

    def _busy_reason(self, skip: bool) -> str:
        busy = f"all {self.pool.buffers} staging buffers hold saves not yet accepted by the daemon"
        if skip:
            return f"{busy} (when_busy='skip')"
        return f"{busy} after waiting {self.config.busy_timeout_s} s (busy_timeout_s)"

    def _track(self, handle: SaveHandle) -> None:
        # Forget saves that ended well; failures stay until wait() reports them.
        self._handles = [
            h for h in self._handles if h.state not in (SaveState.DURABLE, SaveState.SKIPPED)
        ]
        self._handles.append(handle)

    def _check_step(self, step: int) -> None:
        if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < 2**64:
            raise ValueError(f"step must be a non-negative int, got {step!r}")
        if self.last_step is not None and step <= self.last_step:
            raise ValueError(
                f"step {step} is not after step {self.last_step}, "
                "the last step this checkpointer saved"
            )


def _nothing_pending() -> None:
    """A guard's wait when saves copy before returning (``snapshot="copy"``)."""


def shutdown(
    copier: SnapshotThread | None,
    worker: SaveWorker,
    connection: Connection,
    pool: StagingPool,
    timeout_s: float,
) -> None:
    """Hands over queued saves (up to ``timeout_s``), then ends the threads and frees the
    connection and the staging buffers, whatever happened."""
    try:
        if copier is not None:
            copier.finish()  # local copies only: they end without the daemon
        worker.finish(timeout_s)
    finally:
        connection.close()  # aborts calls in flight, so the threads end promptly
        worker.join()
        pool.close()
