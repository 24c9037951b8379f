"""The engine tells its observer about every save and chain head, in order, and an observer
that raises never fails a save."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from ckptd.daemon.domain import StepKey
from ckptd.daemon.engine.observer import ChainHead, DurableSave, EngineObserver
from ckptd.daemon.errors import StorageError
from ckptd.daemon.store.manifest import step_prefix
from ckptd.protos.records import SaveState, StepInfo
from engine_support import RUN, SMALL, WAIT_S, open_engine, random_walk, save, send


class Recorder(EngineObserver):
    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def save_accepted(self, key: StepKey, raw_bytes: int) -> None:
        self.events.append(("accepted", key.step, raw_bytes))

    def save_durable(self, save: DurableSave) -> None:
        self.events.append(("durable", save))

    def save_failed(self, key: StepKey, kind: str, message: str) -> None:
        self.events.append(("failed", key.step, kind, message))

    def chain_head(self, run: str, rank: int, head: ChainHead | None) -> None:
        self.events.append(("head", run, rank, head))


def test_events_follow_each_save_failure_delete_and_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    states = list(random_walk(3, 3))
    raw = sum(t.array.nbytes for t in states[0].values())
    first, restarted = Recorder(), Recorder()

    async def scenario() -> list[StepInfo]:
        async with open_engine(tmp_path, SMALL, first) as engine:
            await save(engine, 0, states[0])
            await save(engine, 1, states[1])
            real_put = engine.storage.put

            def failing_put(key: str, data: bytes | memoryview) -> None:
                if key.startswith(step_prefix(StepKey(RUN, 0, 2))):
                    raise StorageError(f"disk full writing {key}")
                real_put(key, data)

            monkeypatch.setattr(engine.storage, "put", failing_put)
            accepted = await send(engine, 2, states[2])
            assert (await engine.wait(accepted.key, WAIT_S)).state is SaveState.FAILED
            steps = engine.list_steps(RUN, 0)
        async with open_engine(tmp_path, SMALL, restarted) as engine:
            await engine.delete_run(RUN)
        return steps

    steps = asyncio.run(scenario())

    kinds = [event[0] for event in first.events]
    assert kinds == ["accepted", "durable", "head", "accepted", "durable", "head",
                     "accepted", "failed"]
    durable = [event[1] for event in first.events if event[0] == "durable"]
    assert [(d.key.step, d.kind, d.raw_bytes) for d in durable] == [
        (0, "base", raw), (1, "delta", raw)
    ]
    assert [d.stored_bytes for d in durable] == [s.stored_bytes for s in steps]
    assert all(d.encode_s >= 0 and d.latency_s >= d.encode_s for d in durable)
    heads = [event[3] for event in first.events if event[0] == "head"]
    assert heads == [ChainHead(0, 0, raw, steps[0].stored_bytes),
                     ChainHead(1, 1, raw, steps[1].stored_bytes)]
    (failed,) = [event for event in first.events if event[0] == "failed"]
    assert failed[1:3] == (2, "StorageError")
    assert failed[3].startswith("StorageError: disk full writing ")

    # A restart reports the chain found in storage, then its deletion.
    assert restarted.events == [("head", RUN, 0, heads[-1]), ("head", RUN, 0, None)]


def test_a_raising_observer_is_logged_and_saves_still_succeed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken(EngineObserver):
        def save_durable(self, save: DurableSave) -> None:
            raise RuntimeError("exporter down")

    async def scenario() -> list[SaveState]:
        async with open_engine(tmp_path, SMALL, Broken()) as engine:
            states = random_walk(4, 2)
            await save(engine, 0, next(states))
            await save(engine, 1, next(states))
            return [s.state for s in map(engine.status, [StepKey(RUN, 0, 0), StepKey(RUN, 0, 1)])]

    with caplog.at_level("ERROR", logger="ckptd.engine"):
        assert asyncio.run(scenario()) == [SaveState.DURABLE, SaveState.DURABLE]
    assert [r.getMessage() for r in caplog.records] == ["engine observer failed"] * 2
