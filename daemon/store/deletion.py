"""Deleting steps without breaking the rest of their chain.

A step may be the parent of the next step's delta. Before it goes, that child is rewritten
as a lossless base holding the very same reconstruction (same checksum): new blobs under
new names, then the child's new manifest put atomically, so at every instant the child is
restorable through one of its two manifests. Then the step's manifest is deleted (from
then on it does not exist), then its blobs. A crash between those leaves only unnamed
blobs, which the next start removes. Callers hold the chain's lock.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import numpy as np
from ckptd.daemon import codec
from ckptd.daemon.domain import StepKey
from ckptd.daemon.engine.chain import Chain
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


class Deleter:
    """Deletes steps and runs from storage and the index, rebasing dependants first."""

    def __init__(self, storage: Storage, index: StepIndex, pools: Pools, restorer: Restorer):
        self._storage = storage
        self._index = index
        self._pools = pools
        self._restorer = restorer

    async def delete_step(self, chain: Chain, key: StepKey) -> None:
        entry = self._index.get(key)
        assert entry is not None
        child = self._index.child(key)
        if child is not None:
            await self._rebase(chain, child.manifest)
        await self._pools.run_io(functools.partial(self._storage.delete, [manifest_key(key)]))
        self._index.remove(key)
        await self._delete_quietly([t.blob_key for t in entry.manifest.tensors], key)
        if chain.recon is not None and chain.recon.step == key.step:
            chain.recon = None  # rebuilt from the new latest step before the next delta
        self.refresh_head(chain)

    async def delete_chain(self, chain: Chain) -> int:
        """Deletes every step of the chain: manifests newest first (an older step never
        loses a parent it needs while a newer one still exists), then all blobs."""
        entries = self._index.entries(chain.run, chain.rank)
        manifests = [manifest_key(e.manifest.key) for e in reversed(entries)]
        await self._pools.run_io(functools.partial(self._storage.delete, manifests))
        for entry in entries:
            self._index.remove(entry.manifest.key)
        chain.recon = None
        blobs = [t.blob_key for e in entries for t in e.manifest.tensors]
        await self._delete_quietly(blobs, StepKey(chain.run, chain.rank, 0))
        return len(entries)

    def refresh_head(self, chain: Chain) -> None:
        """Recomputes the head's chain counters after the chain's shape changed."""
        if chain.recon is not None:
            plan = self._index.plan(StepKey(chain.run, chain.rank, chain.recon.step))
            chain.recon = chain.recon.with_plan(plan)

    async def _rebase(self, chain: Chain, child: Manifest) -> None:
        if chain.recon is not None and chain.recon.step == child.key.step:
            arrays = chain.recon.arrays  # never modified in place: safe to encode from
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
            await self._put_manifest(rebased)
        except BaseException:
            keys = [blob_key(child.key, i, tag) for i in range(len(arrays))]
            await self._delete_quietly(keys, child.key)
            raise
        log.info("rebased step %s", step_fields(child.key, stored_bytes=rebased.stored_bytes))
        await self._delete_quietly([t.blob_key for t in child.tensors], child.key)
        await self._renumber_descendants(rebased)

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

    async def _renumber_descendants(self, base: Manifest) -> None:
        """Rewrites base_step/chain_depth of the deltas that now hang off ``base``. These
        fields are informational (restore follows parent pointers), so a failure here is
        logged, not raised."""
        parent = base
        while (entry := self._index.child(parent.key)) is not None:
            updated = dataclasses.replace(
                entry.manifest, base_step=base.key.step, chain_depth=parent.chain_depth + 1
            )
            try:
                await self._put_manifest(updated)
            except Exception as exc:
                log.warning("cannot update chain fields %s",
                            step_fields(updated.key, error=str(exc)))
                return
            parent = updated

    async def _put_manifest(self, manifest: Manifest) -> None:
        data = manifest.to_bytes()
        await self._pools.run_io(
            functools.partial(self._storage.put, manifest_key(manifest.key), data)
        )
        self._index.add(IndexEntry(manifest, len(data)))

    async def _delete_quietly(self, keys: list[str], key: StepKey) -> None:
        try:
            await self._pools.run_io(functools.partial(self._storage.delete, keys))
        except Exception as exc:
            log.warning("cannot delete blobs; removed at next start %s",
                        step_fields(key, count=len(keys), error=str(exc)))
