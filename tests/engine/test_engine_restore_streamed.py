"""``Engine.restoring_streamed``: arrays handed over one at a time while a step is rebuilt.

A restore into shared memory writes each array as it comes and tells its client the
restore is complete only once the iterator ended; so the iterator must yield exactly the
arrays ``restore`` returns, check every blob before decoding it, and end only after the
step's checksum matched.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import numpy as np
import pytest
from ckptd.daemon.domain import RestoredCheckpoint, StepKey
from ckptd.daemon.errors import CorruptCheckpointError
from ckptd.daemon.store.manifest import Manifest, manifest_key
from daemon_harness import stored_blob_key
from engine_support import (
    RUN,
    SMALL,
    assert_same,
    open_engine,
    random_walk,
    restore_streamed,
    save,
)

RAW_BASES = dataclasses.replace(SMALL, base_compression="none")


def test_streamed_arrays_equal_the_restored_ones_after_a_restart(tmp_path: Path) -> None:
    states = list(random_walk(21, 4))

    async def scenario() -> None:
        async with open_engine(tmp_path) as engine:
            for step, state in enumerate(states):
                await save(engine, step, state)
            # Step 3 is the head in memory: its views; the others come from storage.
            for step in (3, 2, 0, None):
                restored = await engine.restore(RUN, 0, step)
                assert_same(await restore_streamed(engine, RUN, step), restored)
        async with open_engine(tmp_path) as engine:  # nothing in memory: all from storage
            for step in range(4):
                restored = await engine.restore(RUN, 0, step)
                assert_same(await restore_streamed(engine, RUN, step), restored)
            assert engine.restore_bytes == 0

    asyncio.run(scenario())


def test_a_corrupt_blob_stops_the_stream_at_its_tensor(tmp_path: Path) -> None:
    state = next(random_walk(22, 1))

    async def scenario() -> None:
        async with open_engine(tmp_path) as engine:
            await save(engine, 0, state)
        last = len(state) - 1
        path = tmp_path / stored_blob_key(tmp_path, RUN, 0, 0, last)
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x40
        path.write_bytes(bytes(data))
        async with open_engine(tmp_path) as engine:
            received: list[np.ndarray] = []
            damaged = stored_blob_key(tmp_path, RUN, 0, 0, last)
            with pytest.raises(CorruptCheckpointError, match=f"blob {damaged}"):
                async with engine.restoring_streamed(RUN, 0, 0) as found:
                    async for array in found.arrays:
                        received.append(array)
            assert len(received) == last
            assert engine.restore_bytes == 0

    asyncio.run(scenario())


def test_the_iterator_ends_only_after_the_step_checksum_matched(tmp_path: Path) -> None:
    state = next(random_walk(23, 1))

    async def scenario() -> None:
        async with open_engine(tmp_path) as engine:
            await save(engine, 0, state)
        path = tmp_path / manifest_key(StepKey(RUN, 0, 0))
        manifest = Manifest.from_bytes(path.read_bytes(), str(path))
        path.write_bytes(dataclasses.replace(manifest, checksum="0" * 32).to_bytes())
        async with open_engine(tmp_path) as engine:
            received: list[np.ndarray] = []
            with pytest.raises(CorruptCheckpointError, match="reconstructs to checksum"):
                async with engine.restoring_streamed(RUN, 0, 0) as found:
                    async for array in found.arrays:
                        received.append(array)
            # Every array was handed over (each blob is sound); only the end is refused.
            assert len(received) == len(state)

    asyncio.run(scenario())


def test_leaving_a_stream_early_releases_its_budget(tmp_path: Path) -> None:
    states = list(random_walk(24, 2))

    async def scenario() -> None:
        async with open_engine(tmp_path) as engine:
            for step, state in enumerate(states):
                await save(engine, step, state)
            async with engine.restoring_streamed(RUN, 0, 0) as found:
                assert engine.restore_bytes > 0
                first = await anext(found.arrays)
                assert first.nbytes == found.tensors[0].nbytes
            assert engine.restore_bytes == 0
            assert_same(await restore_streamed(engine, RUN, 0), await engine.restore(RUN, 0, 0))

    asyncio.run(scenario())


def test_a_stream_resumes_on_the_new_plan_when_a_delete_rebases_its_step(
    tmp_path: Path,
) -> None:
    states = list(random_walk(25, 3))

    async def scenario() -> None:
        async with open_engine(tmp_path) as engine:
            for step, state in enumerate(states):
                await save(engine, step, state)
            expected = await engine.restore(RUN, 0, 1)
            async with engine.restoring_streamed(RUN, 0, 1) as found:
                arrays = [np.array(await anext(found.arrays))]
                # Step 1 is a delta on step 0: deleting step 0 rebases it, and its plan's
                # blobs go away under the stream.
                await engine.delete_step(StepKey(RUN, 0, 0))
                arrays += [np.array(array) async for array in found.arrays]
            got = RestoredCheckpoint(found.key, found.tensors, tuple(arrays), found.metadata,
                                     found.checksum)
            assert_same(got, expected)
            assert [info.kind for info in engine.list_steps(RUN, 0)] == ["base", "delta"]

    asyncio.run(scenario())


def _flip_byte(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x40
    path.write_bytes(bytes(data))


def test_a_corrupt_raw_base_is_named_before_the_stream_ends(tmp_path: Path) -> None:
    # A raw exact blob is not hashed on its way (the step's checksum covers its bytes):
    # the damage must still fail the restore, before its end, naming the blob.
    states = list(random_walk(26, 3))

    async def scenario() -> None:
        async with open_engine(tmp_path, RAW_BASES) as engine:
            for step, state in enumerate(states):
                await save(engine, step, state)
        damaged = stored_blob_key(tmp_path, RUN, 0, 0, 0)  # model.weight's base: raw
        _flip_byte(tmp_path / damaged, -100)  # in its payload, past the header
        async with open_engine(tmp_path, RAW_BASES) as engine:
            for step in (0, 2):  # the base itself, and two deltas applied onto it
                ended = False
                with pytest.raises(CorruptCheckpointError, match=f"blob {damaged} .* fails "
                                   "its checksum"):
                    async with engine.restoring_streamed(RUN, 0, step) as found:
                        async for _ in found.arrays:
                            pass
                        ended = True
                assert not ended
                with pytest.raises(CorruptCheckpointError, match=f"blob {damaged}"):
                    await engine.restore(RUN, 0, step)
            assert engine.restore_bytes == 0

    asyncio.run(scenario())


def test_blobs_before_a_tensors_last_exact_one_are_not_read(tmp_path: Path) -> None:
    # Integer buffers are stored exactly at every step: a later step's restore starts at
    # its own blob, so damage to an earlier step's (unused) blob does not touch it.
    states = list(random_walk(27, 3))
    names = list(states[0])
    ints = names.index("buffers.ints")

    async def scenario() -> None:
        async with open_engine(tmp_path, RAW_BASES) as engine:
            for step, state in enumerate(states):
                await save(engine, step, state)
            expected = await engine.restore(RUN, 0, 2)
        damaged = stored_blob_key(tmp_path, RUN, 0, 0, ints)
        (tmp_path / damaged).unlink()
        async with open_engine(tmp_path, RAW_BASES) as engine:
            assert_same(await restore_streamed(engine, RUN, 2), expected)
            assert_same(await engine.restore(RUN, 0, 2), expected)
            with pytest.raises(CorruptCheckpointError, match=f"blob {damaged}"):
                await restore_streamed(engine, RUN, 0)

    asyncio.run(scenario())
