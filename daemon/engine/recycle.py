"""A replaced head's arrays, kept as the output of the next deltas' reconstructions.

Why: each delta tensor's reconstruction (the chain's next head) was a fresh array, and
pass 2 of the encode faulting in its pages was the largest single item of the encode's
profile (bench/README.md, "Delta saves after a base: reconstructions into a replaced
head"). Once a save is committed the chain's previous head is garbage: the same tensor
sizes as the next save's reconstructions, its pages already mapped. So its memory is kept
and the next delta's encode writes there (``codec.encode_delta(out=...)``: the bytes are
the same; only where they land changes).

Who may still see a replaced head: restores serve a head's arrays as read-only views
without a copy (``Restorer.head_views``), and a caller of ``Engine.restore`` keeps them
after it returns. So an array is kept only when nothing but the head's own tuple refers to
its memory: no view of it (every numpy view refers to the array that owns the memory), no
memoryview or other reference to the head's array object (``sys.getrefcount``, exact
counts: anything unexpected keeps the array out of the pool, as before this module). What
is kept can only be reached through the pool from then on.

Call order, all on the event loop's thread: the engine calls ``retire(old, new)`` once a
save committed and the chain advanced from ``old`` to ``new`` (under the chain's lock, so
no delete or rebase reads ``old`` then); ``SavePipeline.tensor`` calls ``take`` for a
delta tensor's output before its encode; the engine calls ``trim`` after heads were
counted (``ResidentHeads.touch``) and ``clear`` at shutdown.

Memory: kept arrays count with the heads under ``max_resident_bytes``: idle bytes plus the
resident heads' stay within it (``trim`` drops idle arrays, largest first, when heads take
the room); with no resident bound, at most one head's bytes (the last retired) are kept.
During a save the kept arrays become the new head instead of fresh ones, so a save's peak
does not change; between saves the daemon holds that next head's memory already.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import numpy as np
from ckptd.daemon.domain import TensorSpec
from ckptd.daemon.engine.chain import Reconstruction
from ckptd.daemon.engine.resident import ResidentHeads

# References to a retired head's array inside ``_memory_of``: the head's tuple, the local
# ``array`` and ``getrefcount``'s argument; one more when the array owns its memory (the
# local ``owner`` is the same object). To the owner of a view: the view's ``base``, the
# local and the argument. Pinned by tests/engine/test_recycle.py: a count that differs on
# another interpreter only stops the reuse.
_VIEW_REFS = 3
_OWNER_REFS = 4
_BASE_REFS = 3


class SpareOutputs:
    """Idle reconstruction buffers (flat uint8) by size, bounded with the resident heads."""

    def __init__(self, resident: ResidentHeads, lossy: Callable[[TensorSpec], bool]) -> None:
        """``lossy(spec)``: whether a save codes the tensor as a delta (only those take an
        output; an exact tensor's head is its receive buffer)."""
        self._resident = resident
        self._lossy = lossy
        self._idle: dict[int, list[np.ndarray]] = {}
        self._limit_bytes = 0  # with no resident bound: the last retired head's bytes
        self.idle_bytes = 0
        self.recycled_bytes = 0  # handed out again, in all (tests and logs)

    def take(self, nbytes: int) -> np.ndarray | None:
        """A flat uint8 buffer of ``nbytes`` that nothing else refers to, or None."""
        free = self._idle.get(nbytes)
        if not free:
            return None
        buffer = free.pop()
        if not free:
            del self._idle[nbytes]
        self.idle_bytes -= nbytes
        self.recycled_bytes += nbytes
        return buffer

    def retire(self, old: Reconstruction | None, new: Reconstruction) -> int:
        """Keeps the memory of ``old``'s arrays of lossy tensors that nothing else refers
        to and ``new`` does not use, within the room; returns the bytes kept."""
        if old is None or old.arrays is new.arrays:
            return 0
        self._limit_bytes = old.nbytes
        in_use = {id(_owner(array)) for array in new.arrays}
        kept = 0
        for index in [i for i, spec in enumerate(old.specs) if self._lossy(spec)]:
            memory = _memory_of(old.arrays, index)
            if memory is None or id(_owner(memory)) in in_use or not memory.nbytes:
                continue
            if self.idle_bytes + memory.nbytes > self._room():
                continue
            self._idle.setdefault(memory.nbytes, []).append(memory)
            self.idle_bytes += memory.nbytes
            kept += memory.nbytes
        return kept

    def trim(self) -> None:
        """Drops idle buffers, largest first, until they fit the room beside the heads."""
        room = self._room()
        for nbytes in sorted(self._idle, reverse=True):
            free = self._idle[nbytes]
            while free and self.idle_bytes > room:
                free.pop()
                self.idle_bytes -= nbytes
            if not free:
                del self._idle[nbytes]

    def clear(self) -> None:
        """Drops every idle buffer."""
        self._idle.clear()
        self.idle_bytes = 0

    def _room(self) -> int:
        if not self._resident.max_bytes:
            return self._limit_bytes
        return max(0, self._resident.max_bytes - self._resident.resident_bytes)


def _owner(array: np.ndarray) -> np.ndarray:
    """The array whose memory ``array`` views (numpy keeps a view's ``base`` at the owner)."""
    while isinstance(array.base, np.ndarray):
        array = array.base
    return array


def _memory_of(arrays: tuple[np.ndarray, ...], index: int) -> np.ndarray | None:
    """A flat uint8 view of the memory of ``arrays[index]`` when the retiring head's tuple
    ``arrays`` holds the only reference to it (see the counts above), else None."""
    array = arrays[index]
    owner = _owner(array)
    if owner.base is not None or not owner.flags.owndata or not owner.flags.c_contiguous:
        return None  # memory from elsewhere (a mapping, bytes): not ours to reuse
    if owner is array:
        if sys.getrefcount(array) != _OWNER_REFS:
            return None
    elif sys.getrefcount(array) != _VIEW_REFS or sys.getrefcount(owner) != _BASE_REFS:
        return None
    return owner.reshape(-1).view(np.uint8)
