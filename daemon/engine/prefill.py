"""Receive buffers made ready for a chain's next save while the chain is idle.

Why: ``ReceiveBuffers`` keeps a delta's receive buffers for the next save, but a base's
(and any exact tensor's) become the chain's head, so the first delta after a base received
into fresh memory, and faulting its pages in was most of that receive: 1.57 busy seconds
of a 1 GiB delta against 0.26 s for the next delta, whose buffers were reused
(bench/README.md, "Receive buffers ready after a base"). So when a chain's save is durable
and no other save of the chain is reserved, ``Prefill`` allocates, in the I/O pool, one
buffer for each tensor of the head's table that the idle buffers lack, writes one byte per
page so that the kernel maps them now, and hands each to ``ReceiveBuffers.give_back``: the
next save's receive copies into mapped memory, and the page faults happen between saves.
A base starts this sooner, at its ACCEPTED (``accepted``): its buffers will all become the
head, and a base's encode and writes leave the CPU mostly idle (raw blobs, writeback),
while the time between a base's DURABLE and the next save's open was often too short to
map them all (bench/README.md, "Delta saves after a base": 6-89 % of a 1 GiB first
delta's bytes were ready).

Call order, all on the event loop's thread: the engine calls ``accepted(chain, specs,
base=...)`` when a save is accepted, ``schedule(chain)`` once a
save of the chain is durable and nothing else of it is reserved (a job already running for
the chain goes on), ``stop(chain)`` when it
opens a save of the chain (the session takes what is ready; the prefill stops after the
buffer it is making, so its page faults do not compete with the receive for long), and
``close`` at shutdown. ``settled`` waits for every running prefill (tests, benchmarks).

Memory: a buffer is made only if it fits, with the ones being made, in the in-flight
budget's free room at that moment (``ReceiveBuffers.fits``), so idle buffers and reserved
bytes stay within ``max_inflight_bytes`` (the README's memory bound); one that stopped
fitting while it was made (a save reserved its bytes meanwhile) is dropped by
``give_back``.
"""

from __future__ import annotations

import asyncio
import functools
import mmap
from dataclasses import dataclass, field

import numpy as np
from ckptd.daemon.domain import TensorSpec
from ckptd.daemon.engine.buffers import ReceiveBuffers
from ckptd.daemon.engine.chain import Chain
from ckptd.daemon.logs import fields, get_logger
from ckptd.daemon.pools import Pools

log = get_logger("engine")


@dataclass(eq=False)
class _Job:
    """One chain's prefill: the sizes still to make, and whether it was told to stop."""

    sizes: list[int]
    stopped: bool = False
    task: asyncio.Task[None] | None = field(default=None, repr=False)


class Prefill:
    """Per chain, at most one background job making its next save's receive buffers."""

    def __init__(self, buffers: ReceiveBuffers, pools: Pools) -> None:
        self._buffers = buffers
        self._pools = pools
        self._jobs: dict[tuple[str, int], _Job] = {}
        self._making_bytes = 0  # buffers being made now, not yet given back
        self.prepared_bytes = 0  # made and handed to the idle buffers, in all (tests, logs)

    def schedule(self, chain: Chain) -> None:
        """Starts making the buffers that a save of ``chain``'s head table would lack
        (nothing when the chain has no head in memory or a save is reserved)."""
        head = chain.head
        if head is None or chain.reserved or (chain.run, chain.rank) in self._jobs:
            return
        self._start(chain, head.specs)

    def accepted(self, chain: Chain, specs: tuple[TensorSpec, ...], *, base: bool) -> None:
        """A save of ``chain`` with table ``specs`` was accepted: when it is a base and no
        other save of the chain is reserved, starts making its next save's buffers now."""
        if base and len(chain.reserved) == 1:
            self.stop(chain)
            self._start(chain, specs)

    def _start(self, chain: Chain, specs: tuple[TensorSpec, ...]) -> None:
        sizes = self._buffers.lacking([spec.nbytes for spec in specs])
        if not sizes:
            return
        job = _Job(sizes)
        key = (chain.run, chain.rank)
        self._jobs[key] = job
        job.task = asyncio.create_task(
            self._run(key, job), name=f"ckptd-prefill-{chain.run}-{chain.rank}")

    def stop(self, chain: Chain) -> None:
        """Stops ``chain``'s prefill after the buffer being made (if any)."""
        job = self._jobs.pop((chain.run, chain.rank), None)
        if job is not None:
            job.stopped = True

    async def settled(self) -> None:
        """Returns once no prefill is running."""
        while self._jobs:
            tasks = [job.task for job in self._jobs.values() if job.task is not None]
            await asyncio.gather(*tasks, return_exceptions=True)

    async def close(self) -> None:
        """Stops every prefill and waits for the buffers being made (at most one each)."""
        jobs = list(self._jobs.values())
        self._jobs.clear()
        for job in jobs:
            job.stopped = True
        await asyncio.gather(*(job.task for job in jobs if job.task is not None),
                             return_exceptions=True)

    async def _run(self, key: tuple[str, int], job: _Job) -> None:
        made = 0
        try:
            for nbytes in job.sizes:
                if job.stopped:
                    break
                if not self._buffers.fits(self._making_bytes + nbytes):
                    continue  # a smaller one may still fit
                self._making_bytes += nbytes
                try:
                    buffer = await self._pools.run_io(functools.partial(mapped_buffer, nbytes))
                finally:
                    self._making_bytes -= nbytes
                before = self._buffers.idle_bytes
                self._buffers.give_back(buffer)
                made += self._buffers.idle_bytes - before
        finally:
            if self._jobs.get(key) is job:
                del self._jobs[key]
            self.prepared_bytes += made
            log.debug("receive buffers prepared %s", fields(
                run=key[0], rank=key[1], bytes=made, stopped=job.stopped,
                idle_bytes=self._buffers.idle_bytes))


def mapped_buffer(nbytes: int) -> np.ndarray:
    """A new buffer whose pages are mapped (I/O pool): one write per page faults it in
    (the kernel zeroes the page), far cheaper than writing every byte."""
    buffer = np.empty(nbytes, dtype=np.uint8)
    buffer[:: mmap.PAGESIZE] = 0
    return buffer
