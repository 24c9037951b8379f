"""Receive buffers kept for the next save, so a save's bytes land in memory already mapped.

Why: a save's receive copies every byte into fresh ``np.empty`` buffers, and faulting in
fresh pages costs more than the copy itself (``bench/receive.py``; numbers in
``bench/README.md``, "Receive buffers"). A trainer saves the
same tensor table again and again, so a delta's receive buffers, no longer needed once
the tensor is encoded (the delta's reconstruction is other memory: a new array, or a
replaced head's, ``ckptd.daemon.engine.recycle``), fit the next save exactly.

Call order, all on the event loop's thread (no lock): ``SaveSession`` takes one buffer
per tensor (``take``) when the engine opens a save, after its bytes are reserved in the
budget; the engine then calls ``trim``; the pipeline hands a delta-coded tensor's buffer
back (``give_back``) once its encode returned. An exact tensor's buffer becomes the
chain's head and is never given back; nor is an aborted session's, whose copy thread may
still be writing it (``asyncio.to_thread`` does not stop a thread when cancelled).

Memory: idle buffers are kept only within the in-flight budget's free room (idle bytes
plus bytes reserved never exceed ``max_inflight_bytes``), so they add nothing to the
daemon's memory bound; a buffer that does not fit is dropped, and ``trim`` drops idle
buffers (largest first) when a reservation takes the room they held.
"""

from __future__ import annotations

import numpy as np
from ckptd.daemon.engine.budget import ByteBudget


class ReceiveBuffers:
    """Idle byte buffers by size, bounded by the budget's free room."""

    def __init__(self, budget: ByteBudget) -> None:
        self._budget = budget
        self._idle: dict[int, list[np.ndarray]] = {}
        self.idle_bytes = 0
        self.reused = 0  # buffers handed out again (for tests and logs)
        self.reused_bytes = 0  # their bytes, in all (a save's log line: were they ready?)

    def take(self, nbytes: int) -> np.ndarray:
        """A 1-D uint8 buffer of ``nbytes`` (contents undefined): an idle one of that
        size if any, else a new one."""
        free = self._idle.get(nbytes)
        if not free:
            return np.empty(nbytes, dtype=np.uint8)
        buffer = free.pop()
        if not free:
            del self._idle[nbytes]
        self.idle_bytes -= nbytes
        self.reused += 1
        self.reused_bytes += nbytes
        return buffer

    def give_back(self, array: np.ndarray) -> None:
        """Keeps the memory of ``array`` (a received tensor no one else holds any more) for
        a later ``take`` of its size, if it fits in the budget's free room."""
        if array.nbytes == 0 or not array.flags.c_contiguous:
            return
        buffer = array.reshape(-1).view(np.uint8)
        if not self.fits(buffer.nbytes):
            return
        self._idle.setdefault(buffer.nbytes, []).append(buffer)
        self.idle_bytes += buffer.nbytes

    def trim(self) -> None:
        """Drops idle buffers, largest first, until they fit in the budget's free room."""
        for nbytes in sorted(self._idle, reverse=True):
            free = self._idle[nbytes]
            while free and self.idle_bytes > self._room():
                free.pop()
                self.idle_bytes -= nbytes
            if not free:
                del self._idle[nbytes]

    def lacking(self, sizes: list[int]) -> list[int]:
        """The entries of ``sizes`` (one per tensor of a table) that a save of that table
        would find no idle buffer for, in table order."""
        spare = {nbytes: len(free) for nbytes, free in self._idle.items()}
        missing = []
        for nbytes in sizes:
            if spare.get(nbytes, 0):
                spare[nbytes] -= 1
            elif nbytes:
                missing.append(nbytes)
        return missing

    def fits(self, nbytes: int) -> bool:
        """Whether ``give_back`` would keep a buffer of ``nbytes`` now."""
        return self.idle_bytes + nbytes <= self._room()

    def clear(self) -> None:
        """Drops every idle buffer."""
        self._idle.clear()
        self.idle_bytes = 0

    def _room(self) -> int:
        return max(0, self._budget.capacity_bytes - self._budget.in_use_bytes)
