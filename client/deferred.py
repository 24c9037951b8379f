"""Deleting steps once the saves that replace them are durable, for the trainer plug-ins.

The daemon refuses to delete a step of a run while a save of that run is in flight, and a
framework that rotates checkpoints (Lightning's ``save_top_k``, Hugging Face's
``save_total_limit``) asks to delete right after it saves. ``DeferredDeletes`` queues
those deletions and carries them out once every save made so far is done, without
blocking the training loop; a step replaced by a save that did not become durable is
kept. Used from the trainer thread only.
"""

from __future__ import annotations

import contextlib

from .checkpointer import Checkpointer
from .errors import CheckpointNotFoundError
from .handle import SaveHandle, SaveState


class DeferredDeletes:
    """Deletions of one checkpointer's steps, held until no save of it is in flight."""

    def __init__(self, checkpointer: Checkpointer) -> None:
        self.checkpointer = checkpointer
        self._pending: list[SaveHandle] = []
        # Steps to delete, each with the save that replaced it (None: removed outright).
        self._doomed: list[tuple[int, SaveHandle | None]] = []

    def saved(self, handle: SaveHandle) -> None:
        """Registers a save made through the checkpointer (deletions wait for it)."""
        self._pending.append(handle)

    def delete(self, step: int, replaced_by: SaveHandle | None = None) -> None:
        """Queues ``step``; with ``replaced_by``, only once that save is durable."""
        self._doomed.append((step, replaced_by))

    def flush(self, *, block: bool) -> None:
        """Deletes what is queued if every save is done (``block``: waits for them).

        Raises:
            CkptdClientError: A save failed (its error; nothing is deleted then).
        """
        if block:
            self.checkpointer.wait()
        elif not all(handle.done() for handle in self._pending):
            return
        failed = any(handle.state is SaveState.FAILED for handle in self._pending)
        self._pending = []
        if failed:
            self.checkpointer.wait()  # raises the first failure
        doomed, self._doomed = self._doomed, []
        for step, replacement in doomed:
            if replacement is not None and replacement.state is not SaveState.DURABLE:
                continue  # a skipped save replaced nothing: keep what it would have replaced
            # Not found: never became durable, or already deleted by an earlier process.
            with contextlib.suppress(CheckpointNotFoundError):
                self.checkpointer.delete_step(step)


__all__ = ["DeferredDeletes"]
