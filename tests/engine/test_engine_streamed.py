"""Saves encoded while they are received (``ckptd.daemon.engine.streaming``).

What could go wrong: a blob written before the whole checkpoint arrived becomes part of a
committed step although the save was then aborted or incomplete; an aborted save leaves
keys behind, moves the chain's head, or keeps the chain's lock so the next save hangs; a
second save opened meanwhile is encoded against a head that is about to move.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import weakref
from pathlib import Path

import numpy as np
import pytest
from ckptd.daemon.engine.core import Engine
from ckptd.daemon.engine.session import SaveSession
from ckptd.daemon.errors import IncompleteStreamError
from ckptd.daemon.store.manifest import blob_key
from ckptd.protos.records import SaveState
from engine_support import (
    RUN,
    SMALL,
    WAIT_S,
    State,
    assert_same,
    header,
    open_engine,
    random_walk,
    save,
    send,
)


def _write(session: SaveSession, state: State, tensors: range) -> None:
    for index in tensors:
        array = list(state.values())[index].array
        data = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        session.write(index, 0, data.tobytes())


async def _blob_written(engine: Engine, session: SaveSession, index: int) -> str:
    """Waits for tensor ``index``'s encode and put (the task the stream started), returns
    its key."""
    stream = engine._streamed.get(session)
    assert stream is not None

    async def started() -> asyncio.Task[object]:
        while index not in stream._tasks:  # handed through call_soon_threadsafe
            await asyncio.sleep(0)
        return stream._tasks[index]

    await asyncio.wait_for(await asyncio.wait_for(started(), WAIT_S), WAIT_S)
    return blob_key(session.header.key, index, stream.save.blob_tag)


def _step_keys(engine: Engine, step: int) -> list[str]:
    return [key for key in engine.storage.list(f"runs/{RUN}/") if f"/{step:020d}/" in key]


def test_tensors_are_written_before_the_save_is_complete_and_commit_after(
    tmp_path: Path,
) -> None:
    states = list(random_walk(5, 3))

    async def scenario() -> None:
        async with open_engine(tmp_path) as engine:
            await save(engine, 1, states[0])
            session = await engine.open_save(header(2, states[1]))
            assert engine._streamed.get(session) is not None  # the chain was idle, its head ready
            _write(session, states[1], range(3))
            key = await _blob_written(engine, session, 0)
            assert key in engine.storage.list(f"runs/{RUN}/")
            assert engine.list_steps(RUN, 0)[-1].step == 1  # nothing committed yet
            _write(session, states[1], range(3, len(states[1])))
            accepted = await session.commit()
            assert accepted.state is SaveState.ACCEPTED
            assert (await engine.wait(accepted.key, WAIT_S)).state is SaveState.DURABLE
            streamed = await engine.restore(RUN, 0, 2)
            await save(engine, 3, states[2])  # a delta against the streamed save's head
            latest = await engine.restore(RUN, 0, 3)
        async with open_engine(tmp_path) as restarted:
            assert_same(streamed, await restarted.restore(RUN, 0, 2))
            assert_same(latest, await restarted.restore(RUN, 0, 3))

    asyncio.run(scenario())


@pytest.mark.parametrize("how", ["abort", "incomplete"])
def test_an_abandoned_save_leaves_no_key_and_the_chain_serves_the_next(
    tmp_path: Path, how: str
) -> None:
    """Aborted midway (the transport's error path) or committed with bytes missing: what
    was written is deleted, the head stays, the budget and step are free again."""
    states = list(random_walk(6, 3))

    async def scenario() -> None:
        async with open_engine(tmp_path) as engine:
            await save(engine, 1, states[0])
            head = await engine.restore(RUN, 0, 1)
            session = await engine.open_save(header(2, states[1]))
            _write(session, states[1], range(2))
            await _blob_written(engine, session, 0)
            if how == "abort":
                session.abort()
            else:
                with pytest.raises(IncompleteStreamError):
                    async with session:  # as the servicer: aborts on the error
                        await session.commit()
            await engine._streamed.settled()
            assert _step_keys(engine, 2) == []
            assert [info.step for info in engine.list_steps(RUN, 0)] == [1]
            assert_same(head, await engine.restore(RUN, 0, None))
            assert engine.inflight_bytes == 0 and engine.inflight_saves == 0
            await save(engine, 2, states[2])  # the same step again, through the chain
            again = await engine.restore(RUN, 0, 2)
        async with open_engine(tmp_path) as restarted:
            assert_same(again, await restarted.restore(RUN, 0, 2))

    asyncio.run(scenario())


def test_a_save_opened_while_another_is_in_flight_takes_the_usual_path(
    tmp_path: Path,
) -> None:
    states = list(random_walk(8, 4))

    async def scenario() -> None:
        async with open_engine(tmp_path) as engine:
            await save(engine, 1, states[0])
            first = await engine.open_save(header(2, states[1]))
            second = await engine.open_save(header(3, states[2]))
            assert engine._streamed.get(first) is not None and engine._streamed.get(second) is None
            _write(second, states[2], range(len(states[2])))
            third_step = await second.commit()  # queued: waits for step 2
            _write(first, states[1], range(len(states[1])))
            await first.commit()
            assert (await engine.wait(third_step.key, WAIT_S)).state is SaveState.DURABLE
            assert (await send(engine, 4, states[3])).state is SaveState.ACCEPTED
            assert (await engine.wait(header(4, states[3]).key, WAIT_S)).state is \
                SaveState.DURABLE
            restored = [await engine.restore(RUN, 0, step) for step in (2, 3, 4)]
        async with open_engine(tmp_path) as restarted:
            for found in restored:
                assert_same(found, await restarted.restore(RUN, 0, found.key.step))

    asyncio.run(scenario())


def test_a_streamed_save_holds_nothing_once_durable(tmp_path: Path) -> None:
    """The save and its stream refer to each other while it runs; once durable nothing may
    keep the stream (and with it the previous head, GiBs the garbage collector does not
    count) alive until a full collection: checked with the collector off."""
    states = list(random_walk(9, 3))

    async def scenario() -> None:
        async with open_engine(tmp_path) as engine:
            await save(engine, 1, states[0])
            session = await engine.open_save(header(2, states[1]))
            stream = engine._streamed.get(session)
            assert stream is not None
            gone = weakref.ref(stream)
            del stream
            _write(session, states[1], range(len(states[1])))
            accepted = await session.commit()
            del session
            assert (await engine.wait(accepted.key, WAIT_S)).state is SaveState.DURABLE
            await save(engine, 3, states[2])  # the chain's worker moved past step 2
            assert gone() is None

    gc.disable()
    try:
        asyncio.run(scenario())
    finally:
        gc.enable()


@pytest.mark.parametrize("mode", ["always", "ready", "never"])
def test_the_stream_saves_mode_decides_which_saves_are_streamed(
    tmp_path: Path, mode: str
) -> None:
    """``stream_saves``: "always" streams every save on an idle chain, "ready" only one whose
    receive buffers were all mapped already (not a first base; a delta once the buffers
    were made ready after the base), "never" none; every step stores the same either way."""
    states = list(random_walk(21, 3))
    config = dataclasses.replace(SMALL, stream_saves=mode)
    expected = {"always": [True, True, True], "ready": [False, True, True],
                "never": [False, False, False]}[mode]

    async def scenario() -> None:
        streamed = []
        async with open_engine(tmp_path, config) as engine:
            for step, state in enumerate(states, 1):
                await engine._prefill.settled()
                session = await engine.open_save(header(step, state))
                streamed.append(engine._streamed.get(session) is not None)
                _write(session, state, range(len(state)))
                accepted = await session.commit()
                assert (await engine.wait(accepted.key, WAIT_S)).state is SaveState.DURABLE
            restored = [await engine.restore(RUN, 0, step) for step in (1, 2, 3)]
        assert streamed == expected
        async with open_engine(tmp_path) as restarted:
            for found in restored:
                assert_same(found, await restarted.restore(RUN, 0, found.key.step))

    asyncio.run(scenario())
