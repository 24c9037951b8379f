"""The in-flight byte budget: how many bytes of received saves the daemon holds at once.

A save reserves its raw size when its header is accepted and gives it back when it is
durable or failed (or aborted before commit). Used only from the event loop's thread.

Fairness has two rules, both applied whenever room appears:

* **First come, first served.** Waiters are granted in arrival order, and the first one
  that may take bytes but does not fit blocks everyone behind it: a large save at the head
  of the queue is never overtaken by small ones, so it cannot starve.
* **A share per identity** (the trainer, as the transport names it; "" when unknown).
  While an identity is alone (no other identity holds or waits for bytes) it may take the
  whole budget, so a single trainer loses nothing. As soon as another identity holds or
  waits, an identity may take *more* bytes only while what it holds stays within
  ``share * capacity``; its waiters beyond that step aside (keeping their place) instead
  of blocking the queue. An identity that holds nothing may always take one save (if it
  fits), so a save larger than the share is never refused for good. Nothing is taken
  back from an identity already over its share: it gets no more until it is under it, so
  another trainer waits at most for the holder's saves to end (or, for a stream that
  stopped sending, for the save idle timeout the transport enforces).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from dataclasses import dataclass, field

from ckptd.daemon.errors import BusyError, ShuttingDownError


@dataclass(eq=False)
class _Waiter:
    nbytes: int
    identity: str
    future: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class ByteBudget:
    """A FIFO-fair async semaphore counted in bytes, with a per-identity share."""

    def __init__(self, capacity_bytes: int, *, share: float = 1.0) -> None:
        if not 0.0 < share <= 1.0:
            raise ValueError(f"share must be in (0, 1], got {share}")
        self.capacity_bytes = capacity_bytes
        self.share_bytes = int(share * capacity_bytes)
        self._in_use = 0
        self._held: collections.Counter[str] = collections.Counter()  # only entries > 0
        self._queued: collections.Counter[str] = collections.Counter()  # waiters per identity
        self._waiters: collections.deque[_Waiter] = collections.deque()
        self._closed_reason = ""

    @property
    def in_use_bytes(self) -> int:
        return self._in_use

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def held_bytes(self, identity: str) -> int:
        """Bytes ``identity`` holds now."""
        return self._held[identity]

    async def acquire(self, nbytes: int, *, wait: bool, what: str, identity: str = "") -> None:
        """Reserves ``nbytes`` for ``identity``; waits in line unless ``wait`` is False.

        Raises:
            BusyError: ``wait`` is False and the bytes cannot be granted now (no room, saves
                queued first, or ``identity`` is over its share while others use the budget).
            ShuttingDownError: the budget was closed while waiting.
            ValueError: ``nbytes`` exceeds the whole budget (validation rejects that first).
        """
        if nbytes > self.capacity_bytes:
            raise ValueError(f"{what} needs {nbytes} bytes, the budget is {self.capacity_bytes}")
        if self._closed_reason:
            raise ShuttingDownError(self._closed_reason)
        waiter = _Waiter(nbytes, identity)
        self._waiters.append(waiter)
        self._queued[identity] += 1
        self._grant()
        if waiter.future.done():
            return
        if not wait:
            message = self._busy_message(waiter, what)
            self._remove(waiter)
            raise BusyError(message)
        try:
            await waiter.future
        except BaseException:
            future = waiter.future
            if future.done() and not future.cancelled() and future.exception() is None:
                self.release(nbytes, identity)  # granted just as the waiter was cancelled
            else:
                self._remove(waiter)
            raise

    def release(self, nbytes: int, identity: str = "") -> None:
        if nbytes > self._in_use or nbytes > self._held[identity]:
            raise AssertionError(
                f"releasing {nbytes} bytes of {identity!r}, which holds "
                f"{self._held[identity]} ({self._in_use} in use)"
            )
        self._in_use -= nbytes
        self._held[identity] -= nbytes
        if not self._held[identity]:
            del self._held[identity]
        self._grant()

    def close(self, reason: str) -> None:
        """Fails every waiter (and later ``acquire``) with ``ShuttingDownError(reason)``."""
        self._closed_reason = reason
        while self._waiters:
            waiter = self._waiters.popleft()
            self._dequeue(waiter)
            if not waiter.future.done():
                waiter.future.set_exception(ShuttingDownError(reason))

    def _within_share(self, identity: str, nbytes: int) -> bool:
        held = self._held[identity]
        if held == 0 or held + nbytes <= self.share_bytes:
            return True
        others_hold = len(self._held) - (identity in self._held)
        others_wait = len(self._queued) - (identity in self._queued)
        return not (others_hold or others_wait)

    def _grant(self) -> None:
        granted = True
        while granted:  # a grant can change who contends; look again until nothing moves
            granted = False
            for waiter in list(self._waiters):
                if waiter.future.done():
                    self._forget(waiter)
                    continue
                if not self._within_share(waiter.identity, waiter.nbytes):
                    continue  # steps aside, keeps its place
                if self._in_use + waiter.nbytes > self.capacity_bytes:
                    return  # first come, first served: it blocks those behind it
                self._forget(waiter)
                self._in_use += waiter.nbytes
                self._held[waiter.identity] += waiter.nbytes
                waiter.future.set_result(None)
                granted = True

    def _remove(self, waiter: _Waiter) -> None:
        if waiter in self._waiters:
            self._forget(waiter)
        self._grant()  # it may have been the one blocking those behind it

    def _forget(self, waiter: _Waiter) -> None:
        with contextlib.suppress(ValueError):
            self._waiters.remove(waiter)
            self._dequeue(waiter)

    def _dequeue(self, waiter: _Waiter) -> None:
        self._queued[waiter.identity] -= 1
        if not self._queued[waiter.identity]:
            del self._queued[waiter.identity]

    def _busy_message(self, waiter: _Waiter, what: str) -> str:
        ahead = self._waiters.index(waiter)
        held = self._held[waiter.identity]
        share = ""
        if not self._within_share(waiter.identity, waiter.nbytes):
            share = (f"; its identity {waiter.identity!r} already holds {held} bytes, over "
                     f"its share of {self.share_bytes} while other trainers use the budget")
        return (
            f"{what} needs {waiter.nbytes} bytes of the in-flight budget of "
            f"{self.capacity_bytes} bytes, but {self._in_use} are in use and {ahead} saves "
            f"wait before it{share}; retry later, or let the save wait (fail_if_busy=False)"
        )
