"""The engine's memory beyond the in-flight budget: chain heads in an LRU bounded by
``max_resident_bytes``, restores within ``max_restore_bytes``.

Findings covered: the daemon kept one reconstruction per (run, rank) forever (8 finished
40 MB runs: RSS 59 → 373 MiB until restart), and unread restores grew memory outside the
stated bound.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import numpy as np
from ckptd.daemon.engine.core import Engine
from ckptd.daemon.engine.observer import EngineObserver
from engine_support import RUN, SMALL, Tensor, assert_same, header, open_engine, save

NBYTES = 64 * 1024  # one float32 tensor of 16384 elements per chain


def _state(seed: int) -> dict[str, Tensor]:
    rng = np.random.default_rng(seed)
    return {"w": Tensor(rng.standard_normal(NBYTES // 4).astype(np.float32))}


def _head_step(engine: Engine, run: str) -> int | None:
    chain = engine._chains.get((run, 0))
    return chain.head.step if chain is not None and chain.head is not None else None


class Evictions(EngineObserver):
    def __init__(self) -> None:
        self.evicted: list[int] = []
        self.resident: list[int] = []

    def head_evicted(self, nbytes: int) -> None:
        self.evicted.append(nbytes)

    def resident_heads(self, nbytes: int) -> None:
        self.resident.append(nbytes)


def test_least_recently_used_heads_are_evicted_and_rebuilt_on_demand(tmp_path: Path) -> None:
    config = dataclasses.replace(SMALL, max_resident_bytes=2 * NBYTES)
    observer = Evictions()

    async def scenario() -> None:
        async with open_engine(tmp_path, config, observer) as engine:
            for i in range(4):
                await save(engine, 1, _state(i), run=f"r{i}")
                assert engine.resident_bytes <= 2 * NBYTES
            assert [_head_step(engine, f"r{i}") for i in range(4)] == [None, None, 1, 1]
            assert observer.evicted == [NBYTES, NBYTES]
            assert max(observer.resident) == 2 * NBYTES
            # An evicted chain restores from storage, and its next save rebuilds the head
            # (a delta against it, not a new base).
            restored = await engine.restore("r0", 0, None)
            assert restored.arrays[0].tobytes() == _state(0)["w"].array.tobytes()
            await save(engine, 2, _state(10), run="r0")
            (second,) = [s for s in engine.list_steps("r0", 0) if s.step == 2]
            assert second.kind == "delta" and second.parent_step == 1
            assert _head_step(engine, "r0") == 2 and engine.resident_bytes <= 2 * NBYTES

    asyncio.run(scenario())


def test_a_head_in_use_by_a_save_in_flight_is_never_evicted(tmp_path: Path) -> None:
    config = dataclasses.replace(SMALL, max_resident_bytes=NBYTES)

    async def scenario() -> None:
        async with open_engine(tmp_path, config) as engine:
            await save(engine, 1, _state(0), run=RUN)
            session = await engine.open_save(header(2, _state(1), run=RUN))  # keeps it busy
            for i in range(3):
                await save(engine, 1, _state(i + 5), run=f"other{i}")
            assert _head_step(engine, RUN) == 1  # over the bound, but in use
            session.abort()
            await save(engine, 1, _state(9), run="last")  # now idle: evicted
            assert _head_step(engine, RUN) is None
            assert engine.resident_bytes == NBYTES

    asyncio.run(scenario())


def test_restores_hold_their_bytes_in_the_restore_budget(tmp_path: Path) -> None:
    config = dataclasses.replace(SMALL, max_restore_bytes=NBYTES + NBYTES // 2)

    async def scenario() -> None:
        async with open_engine(tmp_path, config) as engine:
            await save(engine, 1, _state(0))
            async with engine.restoring(RUN, 0, 1, identity="a") as first:
                assert engine.restore_bytes == NBYTES
                second = asyncio.create_task(engine.restore(RUN, 0, None))
                await asyncio.sleep(0.05)
                assert not second.done() and engine.restore_bytes == NBYTES  # waits for room
            assert_same(await second, first)
            assert engine.restore_bytes == 0
        # A restore larger than the whole budget runs alone instead of failing.
        tiny = dataclasses.replace(config, max_restore_bytes=NBYTES // 4)
        async with open_engine(tmp_path, tiny) as engine:
            assert_same(await engine.restore(RUN, 0, 1), first)

    asyncio.run(scenario())


def test_open_save_counts_bytes_in_the_identity_share(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with open_engine(tmp_path) as engine:
            session = await engine.open_save(header(1, _state(0)), identity="trainer-a")
            assert engine._budget.held_bytes("trainer-a") == NBYTES
            session.abort()
            assert engine._budget.held_bytes("trainer-a") == 0 == engine.inflight_bytes
            await save(engine, 1, _state(0))
            assert engine.inflight_bytes == 0

    asyncio.run(scenario())


