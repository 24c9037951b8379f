"""Deleting steps and runs keeps every other step restorable, bit for bit."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest
from ckptd.daemon.domain import RestoredCheckpoint, StepKey
from ckptd.daemon.engine.core import Engine
from ckptd.daemon.errors import InvalidRequestError, RunNotFoundError, StepNotFoundError
from ckptd.daemon.store.manifest import step_prefix
from engine_support import RUN, SMALL, assert_same, header, open_engine, random_walk, save, send


def test_delete_step_in_the_middle_rebases_its_child(tmp_path: Path) -> None:
    states = list(random_walk(20, 8))

    async def scenario() -> None:
        async with open_engine(tmp_path) as engine:
            for step in range(6):
                await save(engine, step, states[step])
            before = {s: await engine.restore(RUN, 0, s) for s in range(6)}
            assert await engine.delete_step(StepKey(RUN, 0, 2)) == 1
            assert not engine.storage.list(step_prefix(StepKey(RUN, 0, 2)))
            infos = engine.list_steps(RUN, 0)
            assert [(i.step, i.kind, i.parent_step, i.chain_depth) for i in infos] == [
                (0, "base", None, 0), (1, "delta", 0, 1), (3, "base", None, 0),
                (4, "delta", 3, 1), (5, "delta", 4, 2)]
            # Only the rebased step's current blobs remain in its directory.
            assert len(engine.storage.list(step_prefix(StepKey(RUN, 0, 3)))) == 1 + 8
            await _check_all(engine, before, [0, 1, 3, 4, 5])
            with pytest.raises(StepNotFoundError, match=r"nearby steps: \[0, 1, 3, 4, 5\]"):
                await engine.restore(RUN, 0, 2)
            # Deleting the base and the head; the chain goes on from the new head.
            await engine.delete_step(StepKey(RUN, 0, 0))
            await engine.delete_step(StepKey(RUN, 0, 5))
            await _check_all(engine, before, [1, 3, 4])
            await save(engine, 6, states[6])
            assert engine.list_steps(RUN, 0)[-1].parent_step == 4
            head = await engine.restore(RUN, 0, None)
        async with open_engine(tmp_path) as engine:  # same answers from storage alone
            await _check_all(engine, before, [1, 3, 4])
            assert_same(await engine.restore(RUN, 0, 6), head)
            assert [i.step for i in engine.list_steps(RUN, 0)] == [1, 3, 4, 6]

    asyncio.run(scenario())


async def _check_all(
    engine: Engine, before: dict[int, RestoredCheckpoint], steps: list[int]
) -> None:
    for step in steps:
        assert_same(await engine.restore(RUN, 0, step), before[step])


def test_delete_refuses_while_a_save_is_in_flight(tmp_path: Path) -> None:
    walk = random_walk(21, 2)
    first, second = next(walk), next(walk)

    async def scenario() -> None:
        async with open_engine(tmp_path) as engine:
            await save(engine, 0, first)
            session = await engine.open_save(header(1, second))
            with pytest.raises(InvalidRequestError, match=r"saves of steps \[1\] of "
                               r"run-a/rank0 are in flight"):
                await engine.delete_step(StepKey(RUN, 0, 0))
            with pytest.raises(InvalidRequestError, match="cannot delete run 'run-a'"):
                await engine.delete_run(RUN)
            session.abort()
            assert await engine.delete_step(StepKey(RUN, 0, 0)) == 1
            with pytest.raises(RunNotFoundError):
                await engine.delete_step(StepKey(RUN, 0, 0))

    asyncio.run(scenario())


def test_delete_run_removes_every_rank(tmp_path: Path) -> None:
    config = dataclasses.replace(SMALL, base_interval=2)
    states = list(random_walk(22, 3))

    async def scenario() -> None:
        async with open_engine(tmp_path, config) as engine:
            for rank in (0, 1):
                for step, state in enumerate(states):
                    await save(engine, step, state, rank=rank)
            await save(engine, 0, states[0], run="other")
            assert await engine.delete_run(RUN) == 6
            assert [(r.run, r.rank) for r in engine.list_runs()] == [("other", 0)]
            # The chains' lease records stay: they fence off a writer that lost a chain.
            assert engine.storage.list("runs/") == engine.storage.list("runs/other/")
            with pytest.raises(RunNotFoundError, match="known runs: other"):
                await engine.delete_run(RUN)
            accepted = await send(engine, 0, states[0])  # the run can start over
            assert (await engine.wait(accepted.key, 60)).state.finished

    asyncio.run(scenario())
