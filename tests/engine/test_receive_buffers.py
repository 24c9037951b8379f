"""Receive buffers reused across saves (``ckptd.daemon.engine.buffers``).

What could go wrong: a buffer handed to the next save while something still reads it
(the chain's head, a delta's reference) would corrupt a stored step or the head; idle
buffers kept past the budget would grow the daemon's memory beyond its stated bound.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import numpy as np
from ckptd.daemon.engine.budget import ByteBudget
from ckptd.daemon.engine.buffers import ReceiveBuffers
from engine_support import (
    RUN,
    SMALL,
    assert_same,
    open_engine,
    random_walk,
    save,
)


def test_a_buffer_given_back_is_handed_out_again_for_its_size() -> None:
    pool = ReceiveBuffers(ByteBudget(1 << 20))
    first = pool.take(4096)
    pool.give_back(first.view(np.float32).reshape(32, 32))
    assert pool.idle_bytes == 4096
    assert not np.shares_memory(pool.take(1000), first)  # another size: a new buffer
    assert pool.idle_bytes == 4096
    again = pool.take(4096)
    assert np.shares_memory(again, first) and again.shape == (4096,)
    assert again.dtype == np.uint8
    assert (pool.idle_bytes, pool.reused) == (0, 1)


def test_idle_buffers_stay_within_the_budgets_free_room() -> None:
    async def scenario() -> None:
        budget = ByteBudget(10_000)
        pool = ReceiveBuffers(budget)
        await budget.acquire(6_000, wait=False, what="a save")
        pool.give_back(np.empty(3_000, np.uint8))
        pool.give_back(np.empty(3_000, np.uint8))  # 6_000 idle > 4_000 free: dropped
        assert pool.idle_bytes == 3_000
        budget.release(6_000)
        pool.give_back(np.empty(5_000, np.uint8))
        assert pool.idle_bytes == 8_000
        await budget.acquire(4_000, wait=False, what="the next save")
        pool.trim()  # 6_000 free: the largest idle buffer goes first
        assert pool.idle_bytes == 3_000
        pool.clear()
        assert pool.idle_bytes == 0

    asyncio.run(scenario())


def test_reused_buffers_never_change_a_stored_step_or_the_head(tmp_path: Path) -> None:
    """Saves 3.. receive into the buffers of earlier deltas; each step, restored from the
    head in memory right after its save, equals the same step restored from storage after
    a restart, and exact tensors come back as saved."""
    states = list(random_walk(7, 6))

    async def scenario() -> None:
        heads = []
        async with open_engine(tmp_path) as engine:
            for step, state in enumerate(states, 1):
                await save(engine, step, state)
                heads.append(await engine.restore(RUN, 0, step))  # the head, in memory
                held = engine._receive_buffers.idle_bytes + engine.inflight_bytes
                assert held <= SMALL.max_inflight_bytes
            assert engine._receive_buffers.reused > 0
        async with open_engine(tmp_path) as restarted:
            for step, head in enumerate(heads, 1):
                assert_same(head, await restarted.restore(RUN, 0, step))
        for state, head in zip(states, heads, strict=True):
            for name, tensor in state.items():
                if tensor.array.dtype.kind in "biu" and tensor.dtype != "bfloat16":
                    index = list(state).index(name)
                    assert head.arrays[index].tobytes() == tensor.array.tobytes()

    asyncio.run(scenario())


def test_no_buffer_is_kept_when_the_budget_has_no_room(tmp_path: Path) -> None:
    state_bytes = sum(t.array.nbytes for t in next(random_walk(3, 1)).values())
    config = dataclasses.replace(SMALL, max_inflight_bytes=state_bytes)

    async def scenario() -> None:
        async with open_engine(tmp_path, config) as engine:
            for step, state in enumerate(random_walk(3, 4), 1):
                await save(engine, step, state)
            # Each delta's buffers came back while its own bytes were still reserved.
            assert engine._receive_buffers.idle_bytes == 0
            assert engine._receive_buffers.reused == 0

    asyncio.run(scenario())
