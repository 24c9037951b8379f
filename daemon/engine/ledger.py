"""Where the engine finds a save's outcome after the fact, for ``status()`` and ``wait()``.

A save in flight answers for itself (``QueuedSave.status``); a committed step answers from
the index. What neither holds is remembered here, bounded: the last ``MAX_REMEMBERED``
failed saves (a trainer asks why its save failed after the pipeline forgot it) and the
last ``MAX_REMEMBERED`` durable steps retention removed since (a trainer's ``WaitSave`` can
arrive after retention deleted the step it waits for, and must still hear DURABLE).
Oldest entries are forgotten first. Event-loop only, like the engine.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Iterable
from typing import TypeVar

from ckptd.daemon.domain import SaveStatus, StepKey
from ckptd.daemon.engine.chain import QueuedSave
from ckptd.protos.records import SaveState

__all__ = ["MAX_REMEMBERED", "SaveLedger"]

MAX_REMEMBERED = 4096
_V = TypeVar("_V")


class SaveLedger:
    """The saves in flight, when each was accepted, and the bounded memory of outcomes."""

    def __init__(self) -> None:
        self.inflight: dict[StepKey, QueuedSave] = {}
        self._accepted_at_s: dict[StepKey, float] = {}  # monotonic, for save latency
        self._failed: collections.OrderedDict[StepKey, SaveStatus] = collections.OrderedDict()
        self._retired: collections.OrderedDict[StepKey, None] = collections.OrderedDict()

    def accepted(self, save: QueuedSave) -> None:
        """The pipeline took ``save`` (a retried step forgets its earlier failure)."""
        key = save.header.key
        self.inflight[key] = save
        self._accepted_at_s[key] = time.monotonic()
        self._failed.pop(key, None)

    def latency_s(self, key: StepKey) -> float:
        """Seconds since ``key`` was accepted (0 when it never was)."""
        now = time.monotonic()
        return now - self._accepted_at_s.get(key, now)

    def finished(self, save: QueuedSave) -> None:
        """``save`` ended, DURABLE or FAILED (its state is set)."""
        key = save.header.key
        self.inflight.pop(key, None)
        self._accepted_at_s.pop(key, None)
        if save.state is SaveState.FAILED:
            _remember(self._failed, key, save.status)

    def retired(self, keys: Iterable[StepKey]) -> None:
        """Retention removed these durable steps."""
        for key in keys:
            _remember(self._retired, key, None)

    def outcome(self, key: StepKey, *, indexed: bool) -> SaveStatus | None:
        """The save's state, ``indexed`` saying whether its step is committed; None when
        nothing is known of it."""
        save = self.inflight.get(key)
        if save is not None:
            return save.status
        if indexed or key in self._retired:
            return SaveStatus(key, SaveState.DURABLE)
        return self._failed.get(key)


def _remember(memory: collections.OrderedDict[StepKey, _V], key: StepKey, value: _V) -> None:
    memory[key] = value
    while len(memory) > MAX_REMEMBERED:
        memory.popitem(last=False)
