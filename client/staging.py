"""Staging buffers: where ``save()`` snapshots a state before the daemon takes it.

A snapshot is one byte buffer holding every tensor at a 64-byte-aligned offset (the
``Layout``). Buffers are pooled and reused, so a steady training loop allocates nothing per
save: the pool keeps at most ``max_buffers`` (two by default, so save N+1 can snapshot while
save N is still being handed over), grows a free buffer only when the state grows, and never
holds more than ``max_total_bytes`` at once. A buffer is busy from its snapshot until the
daemon ACCEPTED it (or the save failed); ``acquire`` waits for one to come back.

Thread use: the trainer thread calls ``acquire`` and ``snapshot``; the client's sender
thread calls ``release``; ``close`` is called once by the checkpointer.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from ckptd.protos import segments

from .structure import Leaf

ALIGN_BYTES = segments.ALIGN_BYTES
PAGE_BYTES = 4096


@dataclass(frozen=True)
class Layout:
    """Where each tensor of one snapshot lies in the staging buffer."""

    offsets: tuple[int, ...]
    nbytes: tuple[int, ...]
    total_bytes: int


def plan_layout(sizes: Sequence[int]) -> Layout:
    """Places tensors of the given byte sizes back to back, each aligned to 64 bytes
    (so any dtype view of the buffer is aligned and vectorized copies stay fast)."""
    offsets, total = segments.aligned_offsets(sizes)
    return Layout(offsets, tuple(sizes), total)


class StagingBuffer:
    """A reusable byte buffer exposed as a 1-D ``torch.uint8`` tensor (``data``)."""

    def __init__(self, data: torch.Tensor) -> None:
        self.data = data

    @property
    def capacity(self) -> int:
        return int(self.data.numel())

    def close(self) -> None:
        """Frees the memory; the buffer must not be used afterwards."""
        self.data = torch.empty(0, dtype=torch.uint8)


class HostBuffer(StagingBuffer):
    """Ordinary (optionally page-locked) process memory, for the streaming transport."""

    def __init__(self, capacity: int, *, pinned: bool = False) -> None:
        super().__init__(torch.empty(capacity, dtype=torch.uint8, pin_memory=pinned))


def snapshot(
    leaves: Sequence[Leaf],
    layout: Layout,
    buffer: StagingBuffer,
    only: Sequence[int] | None = None,
    *,
    background: bool = False,
) -> None:
    """Copies every leaf (or the leaves at the indices ``only``) into ``buffer`` at its
    layout offset.

    torch's own ``copy_`` does the work (multithreaded for large tensors, device → host DMA
    for CUDA tensors); CUDA copies are queued without blocking and synchronized once at the
    end, so when this returns the trainer may change its tensors freely.

    ``background`` copies CPU tensors with numpy on the calling thread alone (it releases
    the GIL). A copy overlapping the trainer must not start a second OpenMP team: with more
    OpenMP threads than cores, libgomp stops spinning between parallel regions, and the
    trainer's own small ops measured up to 2x slower for as long as that thread lives.
    """
    devices: set[torch.device] = set()
    indices = range(len(leaves)) if only is None else only
    with torch.no_grad():
        for index in indices:
            leaf, offset, size = leaves[index], layout.offsets[index], layout.nbytes[index]
            if size == 0:
                continue
            target = buffer.data[offset : offset + size]
            value = leaf.value
            if isinstance(value, torch.Tensor) and background and value.device.type == "cpu":
                _copy_on_this_thread(value, target)
            elif isinstance(value, torch.Tensor):
                if value.is_cuda:
                    devices.add(value.device)
                target.view(value.dtype).view(value.shape).copy_(value, non_blocking=value.is_cuda)
            else:
                np.copyto(target.numpy().view(leaf.dtype.numpy).reshape(value.shape), value)
    for device in devices:
        torch.cuda.synchronize(device)


def _copy_on_this_thread(value: torch.Tensor, target: torch.Tensor) -> None:
    source = value.detach().resolve_neg()  # numpy refuses a negated view (copies if one)
    if source.dtype == torch.bfloat16:  # numpy has no bfloat16; the bits are what matter
        source = source.view(torch.int16)
    np.copyto(target.view(source.dtype).view(source.shape).numpy(), source.numpy())


@dataclass
class PoolStats:
    """Counters for tests and benchmarks: how often the pool had to allocate."""

    allocations: int = 0
    allocated_bytes: int = 0


class StagingPool:
    """A bounded pool of staging buffers shared by successive saves."""

    def __init__(
        self,
        allocate: Callable[[int], StagingBuffer],
        *,
        max_buffers: int = 2,
        max_total_bytes: int | None = None,
    ) -> None:
        if max_buffers < 1:
            raise ValueError(f"max_buffers must be >= 1, got {max_buffers}")
        self.allocate = allocate
        # Whether a buffer suits the saves to come (the transport they use can send it):
        # one that does not is closed when it is next idle, so a switch of transport
        # does not keep the other transport's buffers in use.
        self.usable: Callable[[StagingBuffer], bool] = lambda buffer: True
        self.max_buffers = max_buffers
        self.max_total_bytes = max_total_bytes
        self.stats = PoolStats()
        self._free: list[StagingBuffer] = []
        self._busy: list[StagingBuffer] = []
        self._cond = threading.Condition()
        self._closed = False

    def acquire(self, nbytes: int, timeout_s: float | None) -> StagingBuffer | None:
        """Returns a buffer of at least ``nbytes``, waiting up to ``timeout_s`` (None: no
        limit) for a busy one to be released; None when none came back in time.

        Raises:
            ValueError: ``nbytes`` alone exceeds ``max_total_bytes``.
        """
        if self.max_total_bytes is not None and nbytes > self.max_total_bytes:
            raise ValueError(
                f"the state needs {nbytes} bytes of staging but max_staging_bytes is "
                f"{self.max_total_bytes}; raise max_staging_bytes or save a smaller state"
            )
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            while True:
                if self._closed:
                    raise RuntimeError("the staging pool is closed")
                buffer = self._take(nbytes)
                if buffer is not None:
                    self._busy.append(buffer)
                    return buffer
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                self._cond.wait(remaining)

    def release(self, buffer: StagingBuffer) -> None:
        """Returns a buffer once the daemon no longer needs its bytes."""
        with self._cond:
            self._busy.remove(buffer)
            if self._closed or not self.usable(buffer):
                buffer.close()
            else:
                self._free.append(buffer)
            self._cond.notify_all()

    def close(self) -> None:
        """Frees the idle buffers now and busy ones as they are released."""
        with self._cond:
            self._closed = True
            for buffer in self._free:
                buffer.close()
            self._free.clear()
            self._cond.notify_all()

    def restock(self, buffer: StagingBuffer) -> bool:
        """Puts ``buffer``, just allocated by a transport switched to, in place of the
        idle buffers, which are closed (busy ones go when released, unless ``usable``);
        False (``buffer`` closed) when the busy buffers leave no room for it."""
        with self._cond:
            held = sum(b.capacity for b in self._busy)
            too_big = self.max_total_bytes is not None and buffer.capacity > self.max_total_bytes
            if (self._closed or too_big or len(self._busy) >= self.max_buffers
                    or not self._fits(held, buffer.capacity)):
                buffer.close()
                return False
            for victim in self._free:
                victim.close()
            self._free = [buffer]
            self.stats.allocations += 1
            self.stats.allocated_bytes += buffer.capacity
            self._cond.notify_all()
            return True

    @property
    def buffers(self) -> int:
        """How many buffers the pool holds (free and busy)."""
        with self._cond:
            return len(self._free) + len(self._busy)

    def _take(self, nbytes: int) -> StagingBuffer | None:
        fitting = [b for b in self._free if b.capacity >= nbytes and self.usable(b)]
        if fitting:
            best = min(fitting, key=lambda b: b.capacity)
            self._free.remove(best)
            return best
        # The state grew: idle buffers are all too small for it and would only hold
        # memory, so they are replaced rather than kept next to a bigger one.
        for victim in self._free:
            victim.close()
        self._free.clear()
        count = len(self._busy)
        held = sum(b.capacity for b in self._busy)
        size = buffer_bytes(nbytes)
        if count >= self.max_buffers or not self._fits(held, size):
            return None
        buffer = self.allocate(size)
        self.stats.allocations += 1
        self.stats.allocated_bytes += buffer.capacity
        return buffer

    def _fits(self, held: int, size: int) -> bool:
        return self.max_total_bytes is None or held + size <= max(self.max_total_bytes, size)


def buffer_bytes(nbytes: int) -> int:
    """The capacity of the buffer the pool allocates for a snapshot of ``nbytes``."""
    return max(PAGE_BYTES, math.ceil(nbytes / PAGE_BYTES) * PAGE_BYTES)
