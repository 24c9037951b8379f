"""Deleting steps without breaking the rest of their chain.

A step may be the parent of the next step's delta. Before it goes, that child is rewritten
as a lossless base holding the very same reconstruction (same checksum): new blobs under
new names, then the child's new manifest put atomically, so at every instant the child is
restorable through one of its two manifests. Then the step's manifest is deleted (from
then on it does not exist), then its blobs. A crash between those leaves only unnamed
blobs, which the next start removes. Callers serialise writes to the chain (the engine
holds the chain's lock) and update what they keep in memory afterwards.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Awaitable, Callable

import numpy as np
from ckptd.daemon import codec
from ckptd.daemon.domain import StepKey
from ckptd.daemon.errors import CorruptCheckpointError
from ckptd.daemon.logs import get_logger, step_fields
from ckptd.daemon.pools import Pools, gather_bounded
from ckptd.daemon.storage.base import Storage
from ckptd.daemon.store.index import IndexEntry, StepIndex
from ckptd.daemon.store.manifest import (
    BASE,
    EXACT,
    Manifest,
    TensorEntry,
    blob_checksum,
    blob_key,
    manifest_key,
    tensors_checksum,
)
from ckptd.daemon.store.restore import Restorer

log = get_logger("engine")
HeadArrays = tuple[int, tuple[np.ndarray, ...]]
"""A step and its reconstruction held in memory (never modified in place)."""
Commit = Callable[[Manifest], Awaitable[IndexEntry]]
"""Puts a manifest and indexes it (``Repository.commit``)."""


class Deleter:
    """Deletes steps and runs from storage and the index, rebasing dependants first."""

    def __init__(self, storage: Storage, index: StepIndex, pools: Pools, restorer: Restorer):
        self._storage = storage
        self._index = index
        self._pools = pools
        self._restorer = restorer

    async def delete_step(self, key: StepKey, head: HeadArrays | None, commit: Commit) -> None:
        entry = self._index.get(key)
        assert entry is not None
        child = self._index.child(key)
        if child is not None:
            await self._rebase(child.manifest, head, commit)
        await self._pools.run_io(functools.partial(self._storage.delete, [manifest_key(key)]))
        self._index.remove(key)
        await self._delete_quietly([t.blob_key for t in entry.manifest.tensors], key)

    async def delete_chain(self, run: str, rank: int) -> int:
        """Deletes every step of the chain: manifests newest first (an older step never
        loses a parent it needs while a newer one still exists), then all blobs."""
        entries = self._index.entries(run, rank)
        manifests = [manifest_key(e.manifest.key) for e in reversed(entries)]
        await self._pools.run_io(functools.partial(self._storage.delete, manifests))
        for entry in entries:
            self._index.remove(entry.manifest.key)
        blobs = [t.blob_key for e in entries for t in e.manifest.tensors]
        await self._delete_quietly(blobs, StepKey(run, rank, 0))
        return len(entries)

    async def _rebase(self, child: Manifest, head: HeadArrays | None, commit: Commit) -> None:
        if head is not None and head[0] == child.key.step:
            arrays = head[1]  # never modified in place: safe to encode from
        else:
            arrays = await self._restorer.restore(self._index.plan(child.key))
        tag = f"r{time.time_ns():x}"
        try:
            calls = [
                functools.partial(self._write_exact, child, i, array, tag)
                for i, array in enumerate(arrays)
            ]
            entries = await gather_bounded(calls, self._pools.blob_slots)
            specs = child.specs
            checksum = await self._pools.run_codec(lambda: tensors_checksum(specs, arrays))
            if checksum != child.checksum:
                raise CorruptCheckpointError(
                    f"rebasing step {child.key} gave checksum {checksum}, its manifest "
                    f"records {child.checksum}; nothing was deleted"
                )
            rebased = dataclasses.replace(
                child, kind=BASE, parent_step=None, base_step=child.key.step, chain_depth=0,
                tensors=tuple(entries),
            )
            await commit(rebased)
        except BaseException:
            keys = [blob_key(child.key, i, tag) for i in range(len(arrays))]
            await self._delete_quietly(keys, child.key)
            raise
        log.info("rebased step %s", step_fields(child.key, stored_bytes=rebased.stored_bytes))
        await self._delete_quietly([t.blob_key for t in child.tensors], child.key)
        await self._renumber_descendants(rebased, commit)

    async def _write_exact(
        self, child: Manifest, index: int, array: np.ndarray, tag: str
    ) -> TensorEntry:
        spec = child.tensors[index].spec
        bfloat16 = spec.dtype_info.is_bfloat16

        def encode() -> tuple[bytes, str]:
            blob = codec.encode_exact(array, bfloat16=bfloat16)
            return blob, blob_checksum(blob)

        blob, digest = await self._pools.run_codec(encode)
        key = blob_key(child.key, index, tag)
        await self._pools.run_io(functools.partial(self._storage.put, key, blob))
        return TensorEntry(spec, EXACT, key, len(blob), digest)

    async def _renumber_descendants(self, base: Manifest, commit: Commit) -> None:
        """Rewrites base_step/chain_depth of the deltas that now hang off ``base``. These
        fields are informational (restore follows parent pointers), so a failure here is
        logged, not raised."""
        parent = base
        while (entry := self._index.child(parent.key)) is not None:
            updated = dataclasses.replace(
                entry.manifest, base_step=base.key.step, chain_depth=parent.chain_depth + 1
            )
            try:
                await commit(updated)
            except Exception as exc:
                log.warning("cannot update chain fields %s",
                            step_fields(updated.key, error=str(exc)))
                return
            parent = updated

    async def _delete_quietly(self, keys: list[str], key: StepKey) -> None:
        try:
            await self._pools.run_io(functools.partial(self._storage.delete, keys))
        except Exception as exc:
            log.warning("cannot delete blobs; removed at next start %s",
                        step_fields(key, count=len(keys), error=str(exc)))
