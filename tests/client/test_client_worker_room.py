"""The sender's choice of transport per buffer, and the pool's staging cap, while
``/dev/shm`` is full and after it has room again (``SaveWorker``, ``StagingPool``), with
stand-in transports: no daemon is needed to decide which transport a buffer goes by."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from ckptd.client.errors import SharedMemoryFullError
from ckptd.client.staging import HostBuffer, StagingBuffer, StagingPool
from ckptd.client.transport import SaveTransport
from ckptd.client.worker import SaveWorker

MAX_BYTES = 1 << 20


class Segment(HostBuffer):
    """Stands for a shared-memory staging buffer."""


class FullableShm(SaveTransport):
    name = "shm"

    def __init__(self) -> None:
        self.full = True

    def allocate(self, capacity: int) -> StagingBuffer:
        if self.full:
            raise SharedMemoryFullError("/dev/shm has no room (stand-in)")
        return Segment(capacity)

    def accepts(self, buffer: StagingBuffer) -> bool:
        return isinstance(buffer, Segment)

    def send(self, header: Any, buffer: StagingBuffer, layout: Any) -> Any:
        raise AssertionError("not sent in these tests")


class Stream(SaveTransport):
    name = "grpc"

    def allocate(self, capacity: int) -> StagingBuffer:
        return HostBuffer(capacity)

    def send(self, header: Any, buffer: StagingBuffer, layout: Any) -> Any:
        raise AssertionError("not sent in these tests")


@pytest.fixture
def parts() -> Iterator[tuple[FullableShm, Stream, StagingPool, SaveWorker]]:
    shm, stream = FullableShm(), Stream()
    pool = StagingPool(shm.allocate, max_buffers=2, max_total_bytes=MAX_BYTES)
    worker = SaveWorker(connection=None, transport=shm, pool=pool,  # type: ignore[arg-type]
                        fallback=lambda: stream)
    yield shm, stream, pool, worker
    worker.finish(1)


def test_a_segment_the_pool_holds_goes_by_shared_memory_while_dev_shm_is_full(
    parts: tuple[FullableShm, Stream, StagingPool, SaveWorker],
) -> None:
    """A full ``/dev/shm`` stops new segments, not the ones the pool already has: those
    still go by shared memory (they were streamed, for the rest of the run)."""
    shm, stream, pool, worker = parts
    shm.full = False
    segment = pool.acquire(1000, 0)
    shm.full = True
    host = pool.acquire(1000, 0)  # the second buffer does not fit: saves stream from now
    assert isinstance(segment, Segment) and type(host) is HostBuffer
    assert worker.transport is stream
    assert worker._carrier(segment) is shm and worker._carrier(host) is stream


def test_no_segment_over_the_staging_cap_on_the_way_back_to_shared_memory(
    parts: tuple[FullableShm, Stream, StagingPool, SaveWorker],
) -> None:
    shm, stream, pool, worker = parts
    pool.release(pool.acquire(MAX_BYTES // 2, 0))  # /dev/shm full: a host buffer, streamed
    assert worker.transport is stream
    shm.full = False  # room again, but the state outgrew max_staging_bytes
    worker.reconsider(4 * MAX_BYTES)
    with pytest.raises(ValueError, match="max_staging_bytes"):
        pool.acquire(4 * MAX_BYTES, 0)
    held = sum(b.capacity for b in pool._free + pool._busy)
    assert held <= MAX_BYTES
    too_big = Segment(2 * MAX_BYTES)
    assert not pool.restock(too_big) and too_big.capacity == 0  # closed, not kept
