"""A replaced head's arrays reused as the next deltas' reconstructions
(``ckptd.daemon.engine.recycle``).

What could go wrong: memory reused while a restore (or a caller of ``Engine.restore``)
still reads the replaced head would change what that reader sees; a reconstruction written
into reused memory must store the same bytes as one written into a new array; kept memory
must stay within the resident bound.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import numpy as np
from ckptd.daemon.domain import TensorSpec
from ckptd.daemon.engine.chain import Reconstruction
from ckptd.daemon.engine.recycle import SpareOutputs
from ckptd.daemon.engine.resident import ResidentHeads
from daemon_harness import stored_blob_key
from engine_support import RUN, SMALL, assert_same, open_engine, random_walk, save


def _head(step: int, arrays: tuple[np.ndarray, ...]) -> Reconstruction:
    specs = tuple(TensorSpec(f"t{i}", "float32", a.shape) for i, a in enumerate(arrays))
    return Reconstruction(step, specs, arrays, "", 1, step - 1, 0, 0)


def _as_head_array(count: int) -> np.ndarray:
    """Like a delta's head: a view (shaped) of the buffer the codec wrote."""
    return np.empty(count, np.float32).reshape(-1, 4)


def test_only_memory_no_one_else_refers_to_is_kept() -> None:
    """Views, memoryviews and references to a head's array keep its memory out of the pool;
    an array that owns its memory and a view of one are kept when free (the head's tuple
    is their only holder: no local names them here)."""
    spare = SpareOutputs(ResidentHeads(0), lambda spec: True)
    old = _head(1, (_as_head_array(64), np.empty(64, np.float32),
                    *(_as_head_array(64) for _ in range(3))))
    free = {old.arrays[0].ctypes.data, old.arrays[1].ctypes.data}
    reader_view = old.arrays[2][1:]
    reader_buffer = memoryview(old.arrays[3])
    reader_reference = [old.arrays[4]]
    new = _head(2, tuple(np.zeros(64, np.float32) for _ in range(5)))
    assert spare.retire(old, new) == 2 * 256
    taken = [spare.take(256), spare.take(256)]
    assert spare.take(256) is None and spare.idle_bytes == 0
    assert {t.ctypes.data for t in taken if t is not None} == free
    assert all(t is not None and t.dtype == np.uint8 and t.size == 256 for t in taken)
    assert spare.recycled_bytes == 512
    assert (reader_view.size, reader_buffer.nbytes, len(reader_reference)) == (60, 256, 1)


def test_memory_the_new_head_uses_is_not_kept() -> None:
    """An array both heads hold (a table carried over) stays the new head's."""
    spare = SpareOutputs(ResidentHeads(0), lambda spec: True)
    shared = np.empty(16, np.float32)
    old = _head(1, (shared, np.empty(16, np.float32)))
    new = _head(2, (shared[:], np.zeros(16, np.float32)))
    assert spare.retire(old, new) == 64
    assert not np.shares_memory(spare.take(64), shared)


def test_kept_memory_fits_beside_the_heads_in_the_resident_bound() -> None:
    resident = ResidentHeads(1000)
    spare = SpareOutputs(resident, lambda spec: True)
    old = _head(1, tuple(np.empty(100, np.float32) for _ in range(3)))  # 3 x 400 bytes
    new = _head(2, tuple(np.zeros(100, np.float32) for _ in range(1)))
    assert spare.retire(old, new) == 800  # the third does not fit in 1000 bytes
    resident._total = 600  # heads took room (``ResidentHeads.touch``)
    spare.trim()
    assert spare.idle_bytes == 400


def test_exact_tensors_are_not_kept() -> None:
    """Only tensors a save codes as deltas take an output."""
    spare = SpareOutputs(ResidentHeads(0), lambda spec: spec.name == "t1")
    old = _head(1, (np.empty(8, np.float32), np.empty(8, np.float32)))
    assert spare.retire(old, _head(2, (np.zeros(8, np.float32),) * 2)) == 32


def test_reconstructions_into_reused_memory_store_the_same_bytes(tmp_path: Path) -> None:
    """The same saves with and without reuse store byte-identical blobs and manifests'
    checksums, and every step restores the same from storage."""
    states = list(random_walk(5, 6))

    async def run(root: Path, reuse: bool) -> int:
        async with open_engine(root) as engine:
            if not reuse:
                engine._pipeline._output = None
            for step, state in enumerate(states, 1):
                await save(engine, step, state)
            return engine._outputs.recycled_bytes

    async def scenario() -> None:
        assert await run(tmp_path / "reused", True) > 0
        assert await run(tmp_path / "fresh", False) == 0
        compared = 0
        for step in range(1, len(states) + 1):
            for index in range(len(states[0])):
                reused, fresh = (root / stored_blob_key(root, RUN, 0, step, index)
                                 for root in (tmp_path / "reused", tmp_path / "fresh"))
                assert reused.read_bytes() == fresh.read_bytes()
                compared += 1
        assert compared == len(states) * len(states[0])
        async with open_engine(tmp_path / "reused") as a, open_engine(tmp_path / "fresh") as b:
            for step in range(1, len(states) + 1):
                assert_same(await a.restore(RUN, 0, step), await b.restore(RUN, 0, step))

    asyncio.run(scenario())


def test_a_restore_of_the_old_head_keeps_its_bytes_while_later_saves_encode(
    tmp_path: Path,
) -> None:
    """A restore serving step 2 from the head (views, no copy) while steps 3 and 4 are
    saved: its arrays keep step 2's bytes, and the memory of heads no one reads is reused."""
    states = list(random_walk(9, 5))

    async def scenario() -> None:
        async with open_engine(tmp_path) as engine:
            await save(engine, 1, states[0])
            await save(engine, 2, states[1])
            async with engine.restoring(RUN, 0, 2) as served:
                before = [array.copy() for array in served.arrays]
                await save(engine, 3, states[2])  # into the base's memory
                recycled = engine._outputs.recycled_bytes
                assert recycled > 0
                await save(engine, 4, states[3])  # step 2's memory is held: fresh arrays
                assert engine._outputs.recycled_bytes == recycled
                head = await engine.restore(RUN, 0, 4)
                assert not any(np.shares_memory(a, b) for a in head.arrays
                               for b in served.arrays)
                del head
                for array, copy in zip(served.arrays, before, strict=True):
                    assert array.tobytes() == copy.tobytes()
            await save(engine, 5, states[4])  # reuses step 3's memory: no one reads it
            assert engine._outputs.recycled_bytes > recycled
            kept = engine._outputs.idle_bytes + engine.resident_bytes
            assert kept <= SMALL.max_resident_bytes
        async with open_engine(tmp_path) as restarted:
            step2 = await restarted.restore(RUN, 0, 2)
            for array, copy in zip(step2.arrays, before, strict=True):
                assert array.tobytes() == copy.tobytes()

    asyncio.run(scenario())


def test_arrays_a_caller_of_restore_keeps_are_never_reused(tmp_path: Path) -> None:
    """``Engine.restore`` returns the head's views and releases its budget on return; the
    caller may keep them across later saves."""
    states = list(random_walk(13, 5))
    config = dataclasses.replace(SMALL, encode_workers=1)

    async def scenario() -> None:
        kept = []
        async with open_engine(tmp_path, config) as engine:
            for step, state in enumerate(states, 1):
                await save(engine, step, state)
                restored = await engine.restore(RUN, 0, step)
                kept.append((restored, [a.copy() for a in restored.arrays]))
            assert engine._outputs.recycled_bytes == 0
        for restored, copies in kept:
            for array, copy in zip(restored.arrays, copies, strict=True):
                assert array.tobytes() == copy.tobytes()

    asyncio.run(scenario())
