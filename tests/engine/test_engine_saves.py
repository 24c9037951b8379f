"""Accepting saves: validation, step order, sessions, the byte budget, failures, drain."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from ckptd.daemon.domain import CheckpointHeader, Policy, StepKey, TensorSpec
from ckptd.daemon.engine.core import Engine
from ckptd.daemon.errors import (
    BusyError,
    IncompleteStreamError,
    InvalidRequestError,
    RunNotFoundError,
    ShuttingDownError,
    StepExistsError,
    StepNotFoundError,
    StepOrderError,
    StorageError,
)
from ckptd.daemon.storage import LocalStorage
from ckptd.daemon.store.manifest import step_prefix
from ckptd.protos.records import SaveState
from engine_support import (
    RUN,
    SMALL,
    WAIT_S,
    Tensor,
    checksum_of,
    header,
    open_engine,
    random_walk,
    save,
    send,
)

F32 = TensorSpec("w", "float32", (4,))


def _with(**changes: Any) -> CheckpointHeader:
    base = CheckpointHeader(StepKey(RUN, 0, 1), (F32,))
    return dataclasses.replace(base, **changes)


def _specs(*specs: TensorSpec) -> CheckpointHeader:
    return _with(tensors=specs)


LIMITS = dataclasses.replace(
    SMALL, max_inflight_bytes=4096, max_checkpoint_bytes=8192, max_tensors=3,
    max_name_chars=16, max_metadata_bytes=32,
)

INVALID = [
    (_with(key=StepKey("", 0, 1)), "invalid run name ''"),
    (_with(key=StepKey("../x", 0, 1)), r"invalid run name '\.\./x'"),
    (_with(key=StepKey("a/b", 0, 1)), "invalid run name 'a/b'"),
    (_with(key=StepKey(".hidden", 0, 1)), "not starting with '.'"),
    (_with(key=StepKey("x" * 129, 0, 1)), "1-128 characters"),
    (_with(key=StepKey(RUN, -1, 1)), "invalid rank -1: must be >= 0"),
    (_with(key=StepKey(RUN, 0, -5)), "invalid step -5"),
    (_specs(TensorSpec("", "float32", (1,))), "tensor name is empty"),
    (_specs(TensorSpec("n" * 17, "float32", (1,))), "has 17 characters; the limit is 16"),
    (_specs(TensorSpec("a\nb", "float32", (1,))), "contains control characters"),
    (_specs(F32, F32), "names tensor 'w' twice"),
    (_specs(TensorSpec("w", "complex64", (1,))), "unknown dtype 'complex64'"),
    (_specs(TensorSpec("w", "float32", (2, -1))), r"shape \[2, -1\]; dimensions must be >= 0"),
    (_specs(TensorSpec("i", "int32", (4,), Policy.LOSSY)), "lossy policy but has dtype int32"),
    (_specs(TensorSpec("w", "float32", (4,), bits=9)), "asks for 9 bits; use 1..8"),
    (_specs(*(TensorSpec(f"t{i}", "uint8", (1,)) for i in range(4))),
     "has 4 tensors; the limit is 3"),
    (_with(metadata={"k": "v" * 40}), "41 bytes of metadata; the limit is 32"),
    (_specs(TensorSpec("w", "float64", (1025,))), "8200 bytes; the limit is 8192"),
    (_specs(TensorSpec("w", "float32", (1025,))),
     "holds 4100 bytes, more than the whole in-flight budget of 4096 bytes"),
]


@pytest.mark.parametrize(("bad", "message"), INVALID)
def test_open_save_rejects_invalid_headers(tmp_path: Path, bad: CheckpointHeader,
                                          message: str) -> None:
    async def scenario() -> None:
        async with open_engine(tmp_path, LIMITS) as engine:
            with pytest.raises(InvalidRequestError, match=message):
                await engine.open_save(bad)
            assert engine.inflight_bytes == 0
            await _roundtrip_small(engine, StepKey(RUN, 0, 1))  # nothing was reserved

    asyncio.run(scenario())


async def _roundtrip_small(engine: Engine, key: StepKey) -> None:
    session = await engine.open_save(CheckpointHeader(key, (F32,)))
    session.write(0, 0, np.arange(4, dtype=np.float32).tobytes())
    status = await session.commit()
    assert (await engine.wait(status.key, WAIT_S)).state is SaveState.DURABLE


def test_duplicate_and_out_of_order_steps(tmp_path: Path) -> None:
    state = next(random_walk(10, 1))

    async def scenario() -> None:
        async with open_engine(tmp_path) as engine:
            await save(engine, 5, state)
            with pytest.raises(StepExistsError, match="step run-a/rank0/step5 is already saved"):
                await engine.open_save(header(5, state))
            with pytest.raises(StepOrderError, match="not after the latest step saved, 5"):
                await engine.open_save(header(4, state))
            session = await engine.open_save(header(9, state))
            with pytest.raises(StepExistsError, match="step9 is already being saved"):
                await engine.open_save(header(9, state))
            with pytest.raises(StepOrderError, match="latest step in flight, 9"):
                await engine.open_save(header(7, state))
            await save(engine, 3, state, rank=1)  # another rank is another chain
            session.abort()
            await save(engine, 7, state)  # the aborted step 9 no longer counts
            assert [i.step for i in engine.list_steps(RUN, 0)] == [5, 7]

    asyncio.run(scenario())


def test_session_checks_chunk_order_bounds_and_completeness(tmp_path: Path) -> None:
    specs = (TensorSpec("a", "float32", (4,)), TensorSpec("e", "int8", (0,)),
             TensorSpec("b", "uint8", (3,)))

    async def scenario() -> None:
        async with open_engine(tmp_path) as engine:
            session = await engine.open_save(CheckpointHeader(StepKey(RUN, 0, 1), specs))
            assert engine.inflight_bytes == 19
            with pytest.raises(InvalidRequestError, match=r"tensor 2 \('b'\) at offset 0 is out "
                               r"of order; expected tensor 0 \('a'\) at offset 0"):
                session.write(2, 0, b"x")
            session.write(0, 0, b"\0" * 8)
            with pytest.raises(InvalidRequestError, match=r"expected tensor 0 .* at offset 8"):
                session.write(0, 4, b"\0" * 4)
            with pytest.raises(InvalidRequestError, match=r"runs past the end of tensor 0 "
                               r"\('a', 16 bytes\)"):
                session.write(0, 8, b"\0" * 9)
            session.write(0, 8, b"\0" * 8)
            with pytest.raises(IncompleteStreamError, match=r"tensor 2 \('b'\) has 0 of 3"):
                await session.commit()
            assert engine.inflight_bytes == 19  # the transport decides: abort
            session.abort()
            assert engine.inflight_bytes == 0
            with pytest.raises(InvalidRequestError, match="already aborted"):
                session.write(2, 0, b"abc")

            session = await engine.open_save(CheckpointHeader(StepKey(RUN, 0, 1), specs))
            session.fill_from(2, memoryview(b"xyz"))
            with pytest.raises(InvalidRequestError, match="needs 16 bytes, the shared-memory "
                               "view has 3"):
                session.fill_from(0, memoryview(b"abc"))
            session.fill_from(0, memoryview(np.arange(4, dtype=np.float32).tobytes()))
            status = await session.commit()
            session.abort()  # no-op after commit
            assert (await engine.wait(status.key, WAIT_S)).state is SaveState.DURABLE
            restored = await engine.restore(RUN, 0, 1)
            assert [a.tobytes() for a in restored.arrays] == [
                np.arange(4, dtype=np.float32).tobytes(), b"", b"xyz"]
            assert engine.inflight_bytes == 0

    asyncio.run(scenario())


def test_steps_of_a_chain_are_encoded_in_step_order(tmp_path: Path) -> None:
    """Step 2 finishes streaming before step 1: it still waits and becomes 1's delta."""
    walk = random_walk(11, 2)
    first, second = next(walk), next(walk)

    async def scenario() -> None:
        async with open_engine(tmp_path) as engine:
            one = await engine.open_save(header(1, first))
            two = await engine.open_save(header(2, second))
            _fill(two, second)
            status_two = await two.commit()
            assert engine.status(status_two.key).state is SaveState.ACCEPTED
            _fill(one, first)
            await one.commit()
            assert (await engine.wait(status_two.key, WAIT_S)).state is SaveState.DURABLE
            steps = engine.list_steps(RUN, 0)
            assert [(s.step, s.kind, s.parent_step) for s in steps] == [
                (1, "base", None), (2, "delta", 1)]

    asyncio.run(scenario())


def _fill(session: Any, state: dict[str, Tensor]) -> None:
    for index, tensor in enumerate(state.values()):
        session.fill_from(index, memoryview(np.ascontiguousarray(tensor.array).tobytes()))


def test_budget_busy_error_and_waiting_save(tmp_path: Path) -> None:
    config = dataclasses.replace(SMALL, max_inflight_bytes=1000)
    big = {"w": Tensor(np.zeros(150, np.float32))}  # 600 bytes
    other = {"w": Tensor(np.ones(150, np.float32))}

    async def scenario() -> None:
        async with open_engine(tmp_path, config) as engine:
            held = await engine.open_save(header(1, big))
            assert engine.inflight_bytes == 600
            with pytest.raises(BusyError, match="save run-a/rank1/step1 needs 600 bytes of the "
                               "in-flight budget of 1000 bytes, but 600 are in use"):
                await engine.open_save(header(1, other, rank=1, fail_if_busy=True))
            waiting = asyncio.create_task(send(engine, 1, other, rank=2))
            await _until(lambda: engine._budget.waiting == 1)
            assert not waiting.done() and engine.inflight_bytes == 600
            held.abort()
            accepted = await waiting
            assert (await engine.wait(accepted.key, WAIT_S)).state is SaveState.DURABLE
            assert engine.inflight_bytes == 0
            restored = await engine.restore(RUN, 2, 1)
            assert restored.arrays[0].tobytes() == other["w"].array.tobytes()

    asyncio.run(scenario())


async def _until(condition: Callable[[], bool]) -> None:
    """Polls a condition on the loop with a deadline (never a fixed sleep)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while not condition():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


def test_failed_save_reports_reason_and_chain_continues(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    walk = random_walk(12, 4)
    states = [next(walk) for _ in range(4)]

    async def scenario() -> None:
        async with open_engine(tmp_path) as engine:
            await save(engine, 0, states[0])
            await save(engine, 1, states[1])
            head = await engine.restore(RUN, 0, None)
            real_put = engine.storage.put
            failures: list[str] = []

            def failing_put(key: str, data: bytes | memoryview) -> None:
                if key.startswith(step_prefix(StepKey(RUN, 0, 2))) and not failures:
                    failures.append(key)
                    raise StorageError(f"disk full writing {key}")
                real_put(key, data)

            monkeypatch.setattr(engine.storage, "put", failing_put)
            accepted = await send(engine, 2, states[2])
            final = await engine.wait(accepted.key, WAIT_S)
            assert final.state is SaveState.FAILED
            assert final.error == f"StorageError: disk full writing {failures[0]}"
            assert engine.status(accepted.key) == final
            assert engine.inflight_bytes == 0
            with pytest.raises(StepNotFoundError):
                await engine.restore(RUN, 0, 2)
            assert not engine.storage.list(step_prefix(StepKey(RUN, 0, 2)))
            await save(engine, 3, states[3])
            infos = engine.list_steps(RUN, 0)
            assert [(i.step, i.parent_step) for i in infos] == [(0, None), (1, 0), (3, 1)]
            restored = await engine.restore(RUN, 0, 3)
            assert restored.checksum == checksum_of(restored)
            assert (await engine.restore(RUN, 0, 1)).checksum == head.checksum

    asyncio.run(scenario())


def test_drain_waits_for_accepted_saves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = next(random_walk(13, 1))
    gate = threading.Event()

    async def scenario() -> None:
        async with open_engine(tmp_path) as engine:
            real_put = engine.storage.put

            def gated_put(key: str, data: bytes | memoryview) -> None:
                gate.wait(WAIT_S)
                real_put(key, data)

            monkeypatch.setattr(engine.storage, "put", gated_put)
            accepted = await send(engine, 1, state)
            open_session = await engine.open_save(header(2, state))
            assert not await engine.drain(0.05)  # the put is held: not finished
            with pytest.raises(ShuttingDownError, match="shutting down"):
                await engine.open_save(header(3, state))
            _fill(open_session, state)
            await open_session.commit()  # opened before the drain: still accepted
            gate.set()
            assert await engine.drain(WAIT_S)
            assert engine.status(accepted.key).state is SaveState.DURABLE
            assert engine.status(StepKey(RUN, 0, 2)).state is SaveState.DURABLE
            assert engine.inflight_bytes == 0

    try:
        asyncio.run(scenario())
    finally:
        gate.set()


def test_status_of_unknown_saves(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with open_engine(tmp_path) as engine:
            with pytest.raises(RunNotFoundError, match="run 'nope' rank 0 has no saved steps; "
                               "known runs: none"):
                engine.status(StepKey("nope", 0, 1))
            await save(engine, 1, next(random_walk(14, 1)))
            with pytest.raises(StepNotFoundError, match=r"nearby steps: \[1\]"):
                await engine.wait(StepKey(RUN, 0, 2), 0.0)
            with pytest.raises(RunNotFoundError, match="ranks with steps: \\[0\\]"):
                await engine.restore(RUN, 3, None)
            assert [(r.run, r.rank, r.step_count, r.latest_step) for r in engine.list_runs()] == [
                (RUN, 0, 1, 1)]

    asyncio.run(scenario())


def test_close_fails_unfinished_saves_and_restart_cleans_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    walk = random_walk(15, 2)
    first, second = next(walk), next(walk)
    gate = threading.Event()

    async def scenario() -> None:
        async with open_engine(tmp_path) as engine:
            await save(engine, 1, first)
            real_put = engine.storage.put

            entered: list[str] = []

            def gated_put(key: str, data: bytes | memoryview) -> None:
                entered.append(key)
                gate.wait(WAIT_S)
                real_put(key, data)

            monkeypatch.setattr(engine.storage, "put", gated_put)
            accepted = await send(engine, 2, second)
            await _until(lambda: bool(entered))  # a blob put of step 2 is under way
            closing = asyncio.create_task(engine.close())
            await asyncio.sleep(0)  # close cancels the chain's worker before it waits
            gate.set()
            await closing
            final = engine.status(accepted.key)
            assert final.state is SaveState.FAILED and "shut down" in final.error
            assert engine.inflight_bytes == 0
        assert LocalStorage(tmp_path).list(step_prefix(StepKey(RUN, 0, 2)))  # the held put
        async with open_engine(tmp_path) as engine:
            assert [i.step for i in engine.list_steps(RUN, 0)] == [1]
            assert not engine.storage.list(step_prefix(StepKey(RUN, 0, 2)))

    try:
        asyncio.run(scenario())
    finally:
        gate.set()
