"""Overlapped snapshots: ``save()`` returns before the copy, the next update waits for it.

With ``Checkpointer(snapshot="overlap")`` the trainer thread only flattens the state and
reserves a staging buffer; a private thread copies the tensors while the trainer runs its
next forward and backward pass, which read the weights but do not change them. What changes
the weights and the optimizer's state is the optimizer's step, so it is *guarded*:
``Checkpointer.guard(model, optimizer)`` registers a step pre-hook that waits until every
pending copy has finished. What the forward pass does change — module buffers such as batch
norm's running statistics — is small, and the guarded model's buffers are copied inside
``save()``. This is the pipelined snapshot of CheckFreq (Mohan et al., FAST 2021) and the
asynchronous staging of PyTorch's distributed checkpointing: when the trainer leaves a core
free while it computes (as a GPU trainer's host thread does), the copy costs it nothing,
where a copy before ``save()`` returns costs one full memory copy.

The contract is weaker than ``snapshot="copy"``: a saved tensor must not change outside a
guarded call until the copy is done (``Checkpointer.wait_snapshot()`` waits for it
explicitly). Most violations are detected through torch's per-tensor version counters, which
in-place operators bump: the save then fails with ``SnapshotConflictError`` naming the
tensor, and nothing is sent to the daemon. Writes that bypass the counter go unseen —
fused optimizers (``fused=True``), ``tensor.data`` operations, writes through ``.numpy()``
or DLPack views, an in-place operation still running when the copy ends — so the guard is
the contract and the check only a safety net. Numpy arrays, tensors without version
counters (made under ``torch.inference_mode``) and CUDA tensors are copied before
``save()`` returns.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .errors import CkptdClientError, CkptdTimeoutError, SnapshotConflictError
from .staging import StagingBuffer, snapshot
from .structure import Leaf
from .worker import SaveJob

logger = logging.getLogger("ckptd.client")


def version(value: object) -> int | None:
    """The in-place version counter of a tensor, or None when it has none (numpy arrays,
    inference tensors): such leaves must be copied before ``save()`` returns."""
    if not isinstance(value, torch.Tensor) or value.is_inference():
        return None
    return int(value._version)


@dataclass(frozen=True)
class PendingCopy:
    """A save whose staging buffer is reserved but whose tensors are not copied yet."""

    job: SaveJob
    leaves: tuple[Leaf, ...]
    deferred: tuple[int, ...]  # indices of the leaves the thread copies
    versions: tuple[int, ...]  # their version counters when save() was called


def split_leaves(
    leaves: Sequence[Leaf], copy_now: set[int]
) -> tuple[list[int], list[int], list[int]]:
    """Returns (indices copied now, indices deferred, versions of the deferred ones).

    Copied now: leaves without a version counter, leaves whose data pointer is in
    ``copy_now`` (guarded modules' buffers), and CUDA tensors — their device → host copy
    must be ordered after the trainer's kernels on the trainer's own stream, which only
    the trainer's thread can do without stream bookkeeping that no GPU here could test.
    """
    now, deferred, versions = [], [], []
    for index, leaf in enumerate(leaves):
        value = leaf.value
        counter = version(value)
        eager = isinstance(value, torch.Tensor) and (
            value.is_cuda or (value.numel() > 0 and value.data_ptr() in copy_now)
        )
        if counter is None or eager:
            now.append(index)
        else:
            deferred.append(index)
            versions.append(counter)
    return now, deferred, versions


class SnapshotThread:
    """Copies pending snapshots in save order on one private thread, then hands each save
    to ``submit`` (the sender); a conflicting save fails and its buffer goes to ``release``.
    """

    def __init__(
        self,
        submit: Callable[[SaveJob], None],
        release: Callable[[StagingBuffer], None],
    ) -> None:
        self._submit = submit
        self._release = release
        self._queue: queue.Queue[PendingCopy | None] = queue.Queue()
        self._pending = 0
        self._idle = threading.Condition()
        self._pid = os.getpid()
        self._thread = threading.Thread(target=self._loop, name="ckptd-snapshot", daemon=True)
        self._thread.start()

    def put(self, copy: PendingCopy) -> None:
        with self._idle:
            self._pending += 1
        self._queue.put(copy)

    def wait(self, timeout_s: float | None = None) -> None:
        """Returns once every snapshot queued so far is copied (the guards call this).

        Raises:
            CkptdTimeoutError: Copies were still pending after ``timeout_s``.
        """
        if not self._pending:  # the common case in a guard: nothing to wait for, no lock
            return
        if os.getpid() != self._pid:
            # A forked child (a DataLoader worker that steps a guarded optimizer): the copy
            # thread stayed in the parent, so the count it inherited never falls; the copies
            # read the parent's memory, which the child's writes cannot reach.
            return
        with self._idle:
            if not self._idle.wait_for(lambda: self._pending == 0, timeout_s):
                raise CkptdTimeoutError(
                    f"{self._pending} snapshot copies were still running after {timeout_s} s"
                )

    def finish(self) -> None:
        """Copies what is queued, then ends the thread."""
        self._queue.put(None)
        # A checkpointer's finalizer can run on any thread, this one included (a garbage
        # collection during a copy); the thread then ends after that copy on its own.
        if threading.current_thread() is not self._thread:
            self._thread.join()

    def _loop(self) -> None:
        while (copy := self._queue.get()) is not None:
            try:
                self._copy(copy)
            finally:
                with self._idle:
                    self._pending -= 1
                    self._idle.notify_all()

    def _copy(self, copy: PendingCopy) -> None:
        job = copy.job
        try:
            began = time.perf_counter()
            snapshot(copy.leaves, job.layout, job.buffer, copy.deferred, background=True)
            changed = [
                copy.leaves[index].name
                for index, before in zip(copy.deferred, copy.versions, strict=True)
                if version(copy.leaves[index].value) != before
            ]
            if changed:
                raise SnapshotConflictError(
                    f"step {job.handle.step}: {_names(changed)} changed while ckptd was copying "
                    "them (snapshot='overlap'); change saved tensors only in guarded calls "
                    "(Checkpointer.guard) or after Checkpointer.wait_snapshot()"
                )
            logger.debug(
                "step %d copied in the background in %.1f ms",
                job.handle.step,
                (time.perf_counter() - began) * 1e3,
            )
        except Exception as exc:
            self._release(job.buffer)
            error = (
                exc
                if isinstance(exc, CkptdClientError)
                else CkptdClientError(f"step {job.handle.step}: copying the state failed: {exc!r}")
            )
            job.handle._set_failed(error)
            logger.warning("checkpoint step %d failed: %s", job.handle.step, error)
            return
        self._submit(job)


def _names(names: list[str], shown: int = 3) -> str:
    listed = ", ".join(repr(name) for name in names[:shown])
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return f"tensor{'s' if len(names) > 1 else ''} {listed}{more}"


class Guard:
    """What one ``Checkpointer.guard`` call registered: step pre-hooks on the optimizers, and
    the modules whose buffers ``save()`` copies before it returns. ``remove()`` undoes it."""

    def __init__(self, hooks: list[Any], modules: list[torch.nn.Module]) -> None:
        self.hooks = hooks
        self.modules = modules

    def buffer_pointers(self) -> set[int]:
        """Where the guarded modules' buffers live now (looked up per save: ``.to()`` or a
        reassigned buffer moves them)."""
        return {b.data_ptr() for m in self.modules for b in m.buffers() if b.numel()}

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks, self.modules = [], []


def install_guard(targets: Sequence[object], wait: Callable[[], None]) -> Guard:
    """Makes each optimizer's ``step`` wait for pending copies, and marks each module's
    buffers to be copied inside ``save()``.

    Buffers are not guarded by waiting: the forward pass changes them (batch norm's running
    statistics, updated inside its kernel without a version bump; DDP's broadcast from rank
    0 before any submodule hook could run), and a forward waiting for the copy would leave
    nothing to overlap. They are small, so copying them at once costs little.

    Raises:
        TypeError: A target is neither a ``torch.optim.Optimizer`` nor a ``torch.nn.Module``.
    """
    hooks: list[Any] = []
    modules: list[torch.nn.Module] = []
    for target in targets:
        if isinstance(target, torch.optim.Optimizer):
            hooks.append(target.register_step_pre_hook(lambda *_: wait()))
        elif isinstance(target, torch.nn.Module):
            modules.append(target)
        else:
            raise TypeError(
                "guard() takes torch.optim.Optimizer and torch.nn.Module objects, got "
                f"{type(target).__name__}"
            )
    return Guard(hooks, modules)
