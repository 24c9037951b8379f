"""The engine's thread pools and a gather that never leaves work behind.

Codec work (numpy, zstd: they release the GIL) runs in ``encode_workers`` threads; storage
calls run in ``storage_workers`` threads of their own, so that slow I/O (an object store's
latency) never holds a codec thread and the event loop never blocks on either. The chain
leases' few small storage calls (take, renew, fence, release) run in one thread of their
own: queued behind a save's blob writes and syncs (large tensors to an object store, many
ranks' saves at once) a renewal could wait past the lease's ttl, and the daemon would lose
the chain it is writing.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

T = TypeVar("T")


class Pools:
    """``run_codec(fn)`` / ``run_io(fn)`` / ``run_lease(fn)``: await a blocking call in the
    matching pool."""

    def __init__(self, codec_workers: int, io_workers: int) -> None:
        # Tensors worked on at once: enough to keep both pools busy, few enough that only
        # that many tensors' blobs are alive at a time.
        self.width = codec_workers + io_workers
        # The same bound shared by every save and rebase of every chain: ``width`` blobs
        # encoded and not yet written, in all, whatever the number of clients. It is what
        # the daemon's memory bound (README "Memory bound") counts.
        self.blob_slots = asyncio.Semaphore(self.width)
        self._codec = concurrent.futures.ThreadPoolExecutor(
            codec_workers, thread_name_prefix="ckptd-codec"
        )
        self._io = concurrent.futures.ThreadPoolExecutor(io_workers, thread_name_prefix="ckptd-io")
        self._lease = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ckptd-lease")

    def run_codec(self, call: Callable[[], T], /) -> Awaitable[T]:
        return asyncio.get_running_loop().run_in_executor(self._codec, call)

    def run_io(self, call: Callable[[], T], /) -> Awaitable[T]:
        return asyncio.get_running_loop().run_in_executor(self._io, call)

    def run_lease(self, call: Callable[[], T], /) -> Awaitable[T]:
        """A lease's storage call, never queued behind data I/O (module docstring)."""
        return asyncio.get_running_loop().run_in_executor(self._lease, call)

    async def shutdown(self) -> None:
        """Waits (off the loop) for running calls to return, then stops the threads."""
        loop = asyncio.get_running_loop()
        for pool in (self._codec, self._io, self._lease):
            await loop.run_in_executor(None, functools.partial(pool.shutdown, wait=True))


class _Skipped(Exception):
    """A call never started because an earlier one already failed."""


async def gather_bounded(
    calls: Sequence[Callable[[], Awaitable[T]]], limit: int | asyncio.Semaphore
) -> list[T]:
    """Runs ``calls`` at most ``limit`` at a time (or holding one of a shared semaphore's
    slots each); after the first failure the calls not yet started are skipped, the running
    ones finish, and that first failure is raised.

    The bound keeps memory flat (at most ``limit`` tensors' blobs exist at once however
    many tensors a checkpoint has).
    """
    semaphore = limit if isinstance(limit, asyncio.Semaphore) else asyncio.Semaphore(limit)
    failure: list[BaseException] = []

    async def one(call: Callable[[], Awaitable[T]]) -> T:
        async with semaphore:
            if failure:
                raise _Skipped
            try:
                return await call()
            except BaseException as exc:
                failure.append(exc)
                raise

    results = await asyncio.gather(*(one(call) for call in calls), return_exceptions=True)
    if failure:
        raise failure[0]
    return results  # type: ignore[return-value]
