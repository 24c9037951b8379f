"""The in-flight byte budget: how many bytes of received saves the daemon holds at once.

A save reserves its raw size when its header is accepted and gives it back when it is
durable or failed (or aborted before commit). Waiters are served strictly first come,
first served: a large save at the head of the queue is never overtaken by small ones, so
it cannot starve. Used only from the event loop's thread.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib

from ckptd.daemon.errors import BusyError, ShuttingDownError


class ByteBudget:
    """A FIFO-fair async semaphore counted in bytes."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self._in_use = 0
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()
        self._closed_reason = ""

    @property
    def in_use_bytes(self) -> int:
        return self._in_use

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def acquire(self, nbytes: int, *, wait: bool, what: str) -> None:
        """Reserves ``nbytes``; waits in line unless ``wait`` is False.

        Raises:
            BusyError: ``wait`` is False and the bytes do not fit now (or others wait first).
            ShuttingDownError: the budget was closed while waiting.
            ValueError: ``nbytes`` exceeds the whole budget (validation rejects that first).
        """
        if nbytes > self.capacity_bytes:
            raise ValueError(f"{what} needs {nbytes} bytes, the budget is {self.capacity_bytes}")
        if self._closed_reason:
            raise ShuttingDownError(self._closed_reason)
        if not self._waiters and self._in_use + nbytes <= self.capacity_bytes:
            self._in_use += nbytes
            return
        if not wait:
            raise BusyError(
                f"{what} needs {nbytes} bytes of the in-flight budget of {self.capacity_bytes} "
                f"bytes, but {self._in_use} are in use and {len(self._waiters)} saves wait "
                "before it; retry later, or let the save wait (fail_if_busy=False)"
            )
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (nbytes, future)
        self._waiters.append(entry)
        try:
            await future
        except BaseException:
            if future.done() and not future.cancelled() and future.exception() is None:
                self.release(nbytes)  # granted just as the waiter was cancelled
            else:
                self._remove(entry)
            raise

    def release(self, nbytes: int) -> None:
        if nbytes > self._in_use:
            raise AssertionError(f"releasing {nbytes} bytes, only {self._in_use} in use")
        self._in_use -= nbytes
        self._grant()

    def close(self, reason: str) -> None:
        """Fails every waiter (and later ``acquire``) with ``ShuttingDownError(reason)``."""
        self._closed_reason = reason
        while self._waiters:
            _, future = self._waiters.popleft()
            if not future.done():
                future.set_exception(ShuttingDownError(reason))

    def _remove(self, entry: tuple[int, asyncio.Future[None]]) -> None:
        with contextlib.suppress(ValueError):  # already granted or failed
            self._waiters.remove(entry)
        self._grant()  # the head may have been the one blocking those behind it

    def _grant(self) -> None:
        while self._waiters:
            nbytes, future = self._waiters[0]
            if future.done():
                self._waiters.popleft()
                continue
            if self._in_use + nbytes > self.capacity_bytes:
                return
            self._waiters.popleft()
            self._in_use += nbytes
            future.set_result(None)
