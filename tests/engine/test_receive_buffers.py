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
from ckptd.daemon.domain import TensorSpec
from ckptd.daemon.engine.budget import ByteBudget
from ckptd.daemon.engine.buffers import ReceiveBuffers
from ckptd.daemon.engine.chain import Chain, Reconstruction
from ckptd.daemon.engine.prefill import Prefill
from ckptd.daemon.pools import Pools
from ckptd.protos.records import SaveState
from engine_support import (
    RUN,
    SMALL,
    WAIT_S,
    assert_same,
    header,
    open_engine,
    random_walk,
    save,
    send,
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


def test_buffers_are_kept_only_within_the_budgets_free_room(tmp_path: Path) -> None:
    """A budget of one state: a delta's buffers come back while its own bytes are still
    reserved (no room: dropped), and the buffers made ready after each durable save fill
    the room only once nothing is reserved."""
    state_bytes = sum(t.array.nbytes for t in next(random_walk(3, 1)).values())
    config = dataclasses.replace(SMALL, max_inflight_bytes=state_bytes)

    async def scenario() -> None:
        async with open_engine(tmp_path, config) as engine:
            buffers = engine._receive_buffers
            for step, state in enumerate(random_walk(3, 4), 1):
                accepted = await send(engine, step, state)
                assert buffers.idle_bytes + engine.inflight_bytes <= state_bytes
                assert (await engine.wait(accepted.key, WAIT_S)).state is SaveState.DURABLE
                await engine._prefill.settled()
                assert buffers.idle_bytes + engine.inflight_bytes <= state_bytes
            assert buffers.reused > 0 and engine._prefill.prepared_bytes > 0

    asyncio.run(scenario())


def test_after_a_base_the_next_save_receives_into_buffers_made_ready(tmp_path: Path) -> None:
    """A base's buffers become the head; once it is durable, buffers for its whole table are
    made in the background, so the first delta takes none fresh, and it and the steps after
    it restore the same from the head and from storage."""
    states = list(random_walk(11, 3))
    sizes = [t.array.nbytes for t in states[0].values()]

    async def scenario() -> None:
        heads = []
        async with open_engine(tmp_path) as engine:
            buffers = engine._receive_buffers
            await save(engine, 1, states[0])
            await engine._prefill.settled()
            assert buffers.lacking(sizes) == []
            assert engine._prefill.prepared_bytes == sum(sizes)
            assert buffers.idle_bytes + engine.inflight_bytes <= SMALL.max_inflight_bytes
            reused = buffers.reused
            session = await engine.open_save(header(2, states[1]))
            session.abort()
            assert buffers.reused - reused == len(sizes)  # every buffer was ready
            for step, state in enumerate(states, 1):
                if step > 1:
                    await save(engine, step, state)
                heads.append(await engine.restore(RUN, 0, step))
        async with open_engine(tmp_path) as restarted:
            for step, head in enumerate(heads, 1):
                assert_same(head, await restarted.restore(RUN, 0, step))

    asyncio.run(scenario())


def test_a_prefill_makes_only_what_fits_and_stops_when_told(tmp_path: Path) -> None:
    """Sizes that do not fit in the free room are skipped (smaller ones after them are
    still made); a chain with a save reserved gets none; ``stop`` ends a prefill."""
    sizes = (6_000, 9_000, 2_000, 2_000)
    specs = tuple(TensorSpec(f"t{i}", "uint8", (n,)) for i, n in enumerate(sizes))

    async def scenario() -> None:
        budget = ByteBudget(20_000)
        buffers = ReceiveBuffers(budget)
        pools = Pools(1, 1)
        prefill = Prefill(buffers, pools)
        try:
            chain = Chain("run", 0)
            arrays = tuple(np.zeros(n, np.uint8) for n in sizes)
            chain.advance(Reconstruction(1, specs, arrays, "", 1, 0, 0, 0))
            await budget.acquire(8_000, wait=False, what="another save")
            chain.reserved.add(2)
            prefill.schedule(chain)  # a save of the chain is reserved: nothing to do
            await prefill.settled()
            assert buffers.idle_bytes == 0
            chain.reserved.clear()
            prefill.schedule(chain)
            await prefill.settled()
            # 12_000 free: 6_000, then 9_000 does not fit, then 2_000 twice fit.
            assert buffers.idle_bytes == 10_000 and buffers.lacking(list(sizes)) == [9_000]
            assert all(buffers.take(n).nbytes == n for n in (6_000, 2_000, 2_000))
            budget.release(8_000)
            prefill.schedule(chain)
            prefill.stop(chain)  # before the task ran: it makes nothing
            await prefill.settled()
            assert buffers.idle_bytes == 0
        finally:
            await prefill.close()
            await pools.shutdown()

    asyncio.run(scenario())


def test_a_base_makes_its_next_saves_buffers_from_its_acceptance(tmp_path: Path) -> None:
    """The base waits in its chain's queue (the test holds the chain's lock from after the
    save opened); its next save's buffers are made meanwhile, within the budget's free
    room. A delta accepted the same way makes none: its buffers come back once encoded."""
    states = list(random_walk(17, 3))
    sizes = [t.array.nbytes for t in states[0].values()]
    config = dataclasses.replace(SMALL, stream_saves="never")

    async def scenario() -> None:
        async with open_engine(tmp_path, config) as engine:
            buffers, prefill = engine._receive_buffers, engine._prefill
            chain = engine._chain(RUN, 0)
            for step, state in enumerate(states, 1):
                made = prefill.prepared_bytes
                session = await engine.open_save(header(step, state))
                async with chain.lock:  # the save waits in the chain's queue: not durable
                    for index, tensor in enumerate(state.values()):
                        session.write(index, 0, np.ascontiguousarray(tensor.array).tobytes())
                    accepted = await session.commit()
                    await prefill.settled()
                    assert engine.status(accepted.key).state is SaveState.ACCEPTED
                    if step == 1:
                        assert buffers.lacking(sizes) == []
                        assert prefill.prepared_bytes == sum(sizes)
                    else:
                        assert prefill.prepared_bytes == made
                    assert buffers.idle_bytes + engine.inflight_bytes <= SMALL.max_inflight_bytes
                assert (await engine.wait(accepted.key, WAIT_S)).state is SaveState.DURABLE
                await prefill.settled()
            assert buffers.reused >= len(sizes)

    asyncio.run(scenario())
