"""Overlapped snapshots: ``save()`` returns before the copy, the next update waits for it.

With ``Checkpointer(snapshot="overlap")`` the trainer thread only flattens the state and
reserves a staging buffer; a private thread copies the tensors while the trainer runs its
next forward and backward pass, which read the weights but do not change them. What changes
them is the optimizer's step (and, for modules such as batch norm, the forward pass that
updates running statistics), so those calls are *guarded*: ``Checkpointer.guard(model,
optimizer)`` registers pre-hooks that wait until every pending copy has finished. This is
the pipelined snapshot of CheckFreq (Mohan et al., FAST 2021) and the asynchronous staging
of PyTorch's distributed checkpointing: on a host with a free core (or with tensors on a
GPU) the copy costs the trainer nothing, where a copy before ``save()`` returns costs one
full memory copy.

The contract is weaker than ``snapshot="copy"``: a saved tensor must not change outside a
guarded call until the copy is done (``Checkpointer.wait_snapshot()`` waits for it
explicitly). A violation is detected through torch's per-tensor version counters, which
every in-place operation bumps: the save then fails with ``SnapshotConflictError`` naming
the tensor, and nothing is sent to the daemon. The check cannot see an in-place operation
still running when the copy ends, nor the running statistics batch norm updates inside its
kernel (the module guard covers those), so the guards are the contract and the check is
the safety net. Numpy arrays and tensors without version counters (made under
``torch.inference_mode``) are copied before ``save()`` returns.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .errors import CkptdClientError, CkptdTimeoutError, SnapshotConflictError
from .staging import snapshot
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


def split_leaves(leaves: Sequence[Leaf]) -> tuple[list[int], list[int], list[int]]:
    """Returns (indices copied now, indices deferred, versions of the deferred ones)."""
    now, deferred, versions = [], [], []
    for index, leaf in enumerate(leaves):
        counter = version(leaf.value)
        if counter is None:
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
        release: Callable[[Any], None],
    ) -> None:
        self._submit = submit
        self._release = release
        self._queue: queue.Queue[PendingCopy | None] = queue.Queue()
        self._pending = 0
        self._idle = threading.Condition()
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
        with self._idle:
            if not self._idle.wait_for(lambda: self._pending == 0, timeout_s):
                raise CkptdTimeoutError(
                    f"{self._pending} snapshot copies were still running after {timeout_s} s"
                )

    def finish(self) -> None:
        """Copies what is queued, then ends the thread."""
        self._queue.put(None)
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
    """The hooks one ``Checkpointer.guard`` call registered; ``remove()`` takes them off."""

    def __init__(self, hooks: list[Any]) -> None:
        self.hooks = hooks

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks = []


def install_guard(targets: Sequence[object], wait: Callable[[], None]) -> Guard:
    """Makes each optimizer's ``step`` and the forward pass of every submodule that owns
    buffers (batch norm's running statistics) wait for pending copies.

    Raises:
        TypeError: A target is neither a ``torch.optim.Optimizer`` nor a ``torch.nn.Module``.
    """
    hooks: list[Any] = []
    for target in targets:
        if isinstance(target, torch.optim.Optimizer):
            hooks.append(target.register_step_pre_hook(lambda *_: wait()))
        elif isinstance(target, torch.nn.Module):
            for module in target.modules():
                if next(module.buffers(recurse=False), None) is not None:
                    hooks.append(module.register_forward_pre_hook(lambda *_: wait()))
        else:
            raise TypeError(
                "guard() takes torch.optim.Optimizer and torch.nn.Module objects, got "
                f"{type(target).__name__}"
            )
    return Guard(hooks)
