"""Staging buffers: layout, snapshot copies, pooled reuse under a byte budget, shm segments."""

from __future__ import annotations

import os
import threading
from typing import Any

import numpy as np
import pytest
import torch
from ckptd.client.shm import ShmBuffer
from ckptd.client.staging import (
    ALIGN_BYTES,
    HostBuffer,
    StagingBuffer,
    StagingPool,
    plan_layout,
    snapshot,
)
from ckptd.client.structure import flatten
from ckptd.protos.segments import SEGMENT_PREFIX, segment_owner


def test_layout_aligns_every_tensor() -> None:
    layout = plan_layout([3, 0, 64, 65, 8])
    assert layout.offsets == (0, 64, 64, 128, 256)
    assert all(offset % ALIGN_BYTES == 0 for offset in layout.offsets)
    assert layout.total_bytes == 320


def test_snapshot_is_independent_of_later_changes() -> None:
    state: dict[str, Any] = {
        "w": torch.arange(10, dtype=torch.float32),
        "bf": torch.ones(3, dtype=torch.bfloat16),
        "n": np.arange(3, dtype=">i8"),
        "flag": torch.tensor(True),
        "t": torch.arange(6.0).reshape(2, 3).t(),
    }
    flat = flatten(state)
    layout = plan_layout([leaf.nbytes for leaf in flat.leaves])
    buffer = HostBuffer(layout.total_bytes)
    snapshot(flat.leaves, layout, buffer)
    state["w"].add_(100)
    state["bf"].zero_()
    state["n"][:] = -1

    def staged(index: int, dtype: np.dtype) -> np.ndarray:
        offset, size = layout.offsets[index], layout.nbytes[index]
        return buffer.data.numpy()[offset : offset + size].view(dtype)

    assert staged(0, np.dtype("<f4")).tolist() == list(range(10))
    assert staged(1, np.dtype("<u2")).tolist() == [0x3F80] * 3  # bfloat16 1.0
    assert staged(2, np.dtype("<i8")).tolist() == [0, 1, 2]
    assert staged(3, np.dtype("?")).tolist() == [True]
    assert staged(4, np.dtype("<f4")).tolist() == [0, 3, 1, 4, 2, 5]  # row-major of the view


class CountingAllocator:
    def __init__(self) -> None:
        self.sizes: list[int] = []

    def __call__(self, capacity: int) -> StagingBuffer:
        self.sizes.append(capacity)
        return HostBuffer(capacity)


def test_steady_saves_reuse_buffers() -> None:
    allocate = CountingAllocator()
    pool = StagingPool(allocate, max_buffers=2)
    for _ in range(20):
        buffer = pool.acquire(10_000, timeout_s=0)
        assert buffer is not None
        pool.release(buffer)
    assert pool.stats.allocations == 1 and pool.buffers == 1

    first = pool.acquire(10_000, timeout_s=0)
    second = pool.acquire(10_000, timeout_s=0)
    assert first is not None and second is not None and first is not second
    pool.release(first)
    pool.release(second)
    for _ in range(5):
        a, b = pool.acquire(10_000, 0), pool.acquire(10_000, 0)
        assert a is not None and b is not None
        pool.release(a)
        pool.release(b)
    assert pool.stats.allocations == 2


def test_busy_pool_waits_for_a_release_or_times_out() -> None:
    pool = StagingPool(CountingAllocator(), max_buffers=1)
    held = pool.acquire(100, 0)
    assert held is not None
    assert pool.acquire(100, timeout_s=0.05) is None

    releaser = threading.Timer(0.05, pool.release, args=(held,))
    releaser.start()
    again = pool.acquire(100, timeout_s=30)
    releaser.join()
    assert again is held


def test_growing_state_replaces_the_idle_buffer() -> None:
    allocate = CountingAllocator()
    pool = StagingPool(allocate, max_buffers=2)
    small = pool.acquire(5_000, 0)
    assert small is not None
    pool.release(small)
    big = pool.acquire(50_000, 0)
    assert big is not None and big.capacity >= 50_000
    assert pool.buffers == 1 and small.capacity == 0  # the small one was freed
    pool.release(big)
    assert pool.acquire(5_000, 0) is big  # a bigger idle buffer serves a smaller state


def test_budget_limits_buffers_and_rejects_oversized_states() -> None:
    pool = StagingPool(CountingAllocator(), max_buffers=4, max_total_bytes=10_000)
    with pytest.raises(ValueError, match=r"needs 20000 bytes.*max_staging_bytes is 10000"):
        pool.acquire(20_000, 0)
    first = pool.acquire(6_000, 0)
    assert first is not None
    assert pool.acquire(6_000, timeout_s=0) is None  # a second would exceed the budget
    pool.release(first)
    assert pool.acquire(6_000, 0) is first


def test_closed_pool_frees_buffers_as_they_come_back() -> None:
    pool = StagingPool(CountingAllocator(), max_buffers=2)
    idle, busy = pool.acquire(100, 0), pool.acquire(100, 0)
    assert idle is not None and busy is not None
    pool.release(idle)
    pool.close()
    assert idle.capacity == 0 and busy.capacity > 0
    pool.release(busy)
    assert busy.capacity == 0
    with pytest.raises(RuntimeError, match="closed"):
        pool.acquire(100, 0)


def test_a_restocked_pool_drops_the_buffers_the_new_transport_cannot_send() -> None:
    """A transport switch (saves back on shared memory after streaming): the new
    transport's buffer replaces the idle ones at once, and a busy buffer of the old one is
    closed when it comes back instead of serving a later save."""
    pool = StagingPool(CountingAllocator(), max_buffers=2)
    idle, busy = pool.acquire(100, 0), pool.acquire(100, 0)
    assert idle is not None and busy is not None
    refused = HostBuffer(4096)
    assert not pool.restock(refused) and refused.capacity == 0  # no slot beside two busy
    pool.release(idle)
    fresh = HostBuffer(4096)
    old = {id(idle), id(busy)}
    pool.usable = lambda buffer: id(buffer) not in old
    assert pool.restock(fresh) and idle.capacity == 0
    pool.release(busy)
    assert busy.capacity == 0 and pool.buffers == 1
    assert pool.acquire(100, 0) is fresh


def test_shm_buffer_is_a_named_segment_unlinked_on_close() -> None:
    buffer = ShmBuffer(8192)
    path = f"/dev/shm/{buffer.name}"
    assert buffer.name.startswith(SEGMENT_PREFIX) and segment_owner(buffer.name) == os.getpid()
    assert os.path.exists(path)
    buffer.data[:4] = torch.tensor([1, 2, 3, 4], dtype=torch.uint8)
    with open(path, "rb") as segment:
        assert segment.read(4) == b"\x01\x02\x03\x04"
    lingering_view = buffer.data[:16]  # a view that outlives close()
    buffer.close()
    assert not os.path.exists(path)
    assert lingering_view[:4].tolist() == [1, 2, 3, 4]  # still mapped, not a dangling pointer
    buffer.close()  # idempotent
    del lingering_view


def test_segment_owner_ignores_foreign_names() -> None:
    assert segment_owner("psm_1234") is None
    assert segment_owner(f"{SEGMENT_PREFIX}x_y") is None
