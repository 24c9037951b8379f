"""``Worlds`` on real local storage shared by two repositories, as by two daemons.

Each repository commits one rank of a world of two and only indexes its own; both then
check the step at once: both find the other's manifest in storage, at most both try to
create the record, exactly one creates it, and it holds the same bytes whoever wrote it.
A missing record is repaired, and deleting a rank's copy deletes the record.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from ckptd.daemon import codec
from ckptd.daemon.domain import CheckpointHeader, StepKey, TensorSpec
from ckptd.daemon.errors import InvalidRequestError, StepIncompleteError
from ckptd.daemon.pools import Pools
from ckptd.daemon.storage import LocalStorage
from ckptd.daemon.store import lease
from ckptd.daemon.store.manifest import (
    BASE,
    EXACT,
    Manifest,
    TensorEntry,
    blob_checksum,
    blob_key,
    tensors_checksum,
)
from ckptd.daemon.store.repository import Repository
from ckptd.daemon.store.world import record_bytes, world_key

RUN = "w"
SPEC = TensorSpec("n", "int64", (4,))


@pytest.fixture
def pools() -> Iterator[Pools]:
    made = Pools(2, 2)
    yield made
    asyncio.run(made.shutdown())


async def _commit(repo: Repository, rank: int, step: int, world_size: int) -> None:
    key = StepKey(RUN, rank, step)
    array = np.arange(4, dtype=np.int64) + rank
    blob = codec.encode_exact(array)
    repo.storage.put(blob_key(key, 0), blob)
    entry = TensorEntry(SPEC, EXACT, blob_key(key, 0), len(blob), blob_checksum(blob))
    await repo.commit(Manifest(
        key=key, kind=BASE, parent_step=None, base_step=step, chain_depth=0,
        created_unix_s=time.time(), metadata={}, tensors=(entry,),
        checksum=tensors_checksum((SPEC,), (array,)), world_size=world_size))


class _Counting(LocalStorage):
    """Local storage that remembers what each ``put_if_absent`` of a world record returned
    (manifests are created with it too)."""

    created: list[bool]

    def put_if_absent(self, key: str, data: bytes | memoryview) -> bool:
        result = super().put_if_absent(key, data)
        if key.startswith("worlds/"):
            self.created.append(result)
        return result


def test_two_writers_record_a_complete_step_once(tmp_path: Path, pools: Pools) -> None:
    async def scenario() -> None:
        created: list[bool] = []
        repos = []
        for _ in range(2):
            storage = _Counting(tmp_path)
            storage.created = created
            repos.append(Repository(storage, pools))
            await repos[-1].load()
        await _commit(repos[0], 0, 7, 2)
        assert not await repos[0].worlds.committed(StepKey(RUN, 0, 7), 2)  # rank 1 missing
        await _commit(repos[1], 1, 7, 2)
        both = await asyncio.gather(repos[0].worlds.committed(StepKey(RUN, 0, 7), 2),
                                    repos[1].worlds.committed(StepKey(RUN, 1, 7), 2))
        assert both == [True, True]
        assert created.count(True) == 1 and len(created) <= 2
        record = tmp_path / world_key(RUN, 7)
        assert record.read_bytes() == record_bytes(RUN, 7, 2)

        record.unlink()  # a crash between the last commit and the record
        fresh = Repository(LocalStorage(tmp_path), pools)
        await fresh.load()
        assert fresh.step_infos(RUN, 0)[0].missing_ranks == ()  # its index has both ranks
        assert await fresh.worlds.repair() == 1
        assert record.read_bytes() == record_bytes(RUN, 7, 2)

        await fresh.delete_step(StepKey(RUN, 1, 7))
        assert not record.exists()
        with pytest.raises(StepIncompleteError, match=r"ranks \[1\]"):
            await fresh.worlds.restorable(RUN, 0, 7, allow_incomplete=False)
        assert await fresh.worlds.restorable(RUN, 0, 7, allow_incomplete=True) == 7

    asyncio.run(scenario())


def test_a_world_size_change_is_refused_unless_reshardable(tmp_path: Path, pools: Pools) -> None:
    async def scenario() -> None:
        repo = Repository(LocalStorage(tmp_path), pools)
        await repo.load()
        await _commit(repo, 0, 1, 4)
        changed = CheckpointHeader(StepKey(RUN, 1, 2), (SPEC,), world_size=2)
        with pytest.raises(InvalidRequestError, match="world_size 2 but step 1 of rank 0"):
            repo.worlds.check_header(changed)
        repo.worlds.check_header(CheckpointHeader(
            StepKey(RUN, 1, 2), (SPEC,), world_size=2, reshardable=True))
        with pytest.raises(InvalidRequestError, match="rank 4 is outside its world of 4"):
            repo.worlds.check_header(CheckpointHeader(StepKey(RUN, 4, 2), (SPEC,),
                                                      world_size=4))

    asyncio.run(scenario())


async def _late_rank_one(tmp_path: Path, pools: Pools) -> tuple[Repository, Repository]:
    """Repository ``a`` commits rank 0 of step 7 (a world of 2); another daemon takes rank
    1's chain, finding no step in it; then ``b``, a writer that had lost rank 1's lease,
    commits rank 1 of step 7 past that fence: a void manifest (``store.lease.is_void``)."""
    a, b = (Repository(LocalStorage(tmp_path), pools) for _ in range(2))
    for repo in (a, b):
        await repo.load()
    await _commit(a, 0, 7, 2)
    lease.take(a.storage, RUN, 1, "daemon-c", ttl_s=30, now_unix_s=time.time(),
               after_step=None)
    await _commit(b, 1, 7, 2)
    return a, b


def test_a_void_manifest_does_not_complete_a_world_step(tmp_path: Path, pools: Pools) -> None:
    async def scenario() -> None:
        a, _ = await _late_rank_one(tmp_path, pools)
        assert await a.worlds.missing_ranks(RUN, 7, 2) == (1,)
        with pytest.raises(StepIncompleteError, match=r"ranks \[1\]"):
            await a.worlds.restorable(RUN, 0, 7, allow_incomplete=False)
        assert not (tmp_path / world_key(RUN, 7)).exists()

    asyncio.run(scenario())


def test_a_record_that_a_void_manifest_completed_goes_at_the_next_scan(
    tmp_path: Path, pools: Pools
) -> None:
    async def scenario() -> None:
        _, b = await _late_rank_one(tmp_path, pools)
        # The late writer records the world from its own index before anyone saw the fence.
        assert await b.worlds.committed(StepKey(RUN, 1, 7), 2)
        record = tmp_path / world_key(RUN, 7)
        assert record.exists()
        fresh = Repository(LocalStorage(tmp_path), pools)
        found = await fresh.load()
        assert [m.key for m in found.void] == [StepKey(RUN, 1, 7)]
        assert not record.exists()
        with pytest.raises(StepIncompleteError, match=r"ranks \[1\]"):
            await fresh.worlds.restorable(RUN, 0, 7, allow_incomplete=False)
        assert await fresh.worlds.restorable(RUN, 0, None, allow_incomplete=True) == 7

    asyncio.run(scenario())
