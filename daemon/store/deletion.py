"""Deleting steps without breaking the rest of their chain.

A step may be the parent of the next step's delta. Before it goes, that child is rewritten
as a lossless base holding the very same reconstruction (same checksum): new blobs under
new names, then the child's new manifest put atomically, so at every instant the child is
restorable through one of its two manifests. Then the step's ``pending`` marker is put
(the commit protocol's proof that a directory without a manifest holds nothing committed),
the manifest is deleted (from then on the step does not exist), then its blobs, then the
marker. A crash anywhere leaves unnamed blobs beside a readable manifest, or a marked
directory without one: the next start removes both. Callers serialise writes to the chain
(the engine holds the chain's lock) and update what they keep in memory afterwards.

A full disk. Deleting is how an operator frees space, but a rebase writes first: the
child's new exact blobs, about the size of the chain's base, must be durable before
anything of the parent may go (the child would be unrestorable in between, and a crash
there would lose it and every delta after it). So a deletion that must rebase first
checks the backend's free space (``Storage.free_bytes``) against that estimate and refuses
before writing anything, and a rebase that runs out of space anyway (the estimate is not a
bound; S3 reports no free space) removes what it wrote; both errors name the space needed
and what to delete instead: the step together with the deltas that depend on it, newest
first, rewrites nothing and only frees space, as does any step nothing depends on. The
markers a deletion puts are empty objects, which a full file system still takes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import functools
import itertools
import time
from collections.abc import Awaitable, Callable

import numpy as np
from ckptd.daemon import codec
from ckptd.daemon.domain import StepKey
from ckptd.daemon.errors import (
    ChainLeasedError,
    CorruptCheckpointError,
    StorageError,
    StorageFullError,
)
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
    hidden_key,
    manifest_key,
    pending_key,
    tensors_checksum,
)
from ckptd.daemon.store.restore import Restorer

log = get_logger("engine")
HeadArrays = tuple[int, tuple[np.ndarray, ...]]
"""A step and its reconstruction held in memory (never modified in place)."""
Commit = Callable[[Manifest], Awaitable[IndexEntry]]
"""Replaces a committed manifest and indexes it (``Repository.rewrite``)."""
Pause = Callable[[str], Awaitable[None]]
"""Awaited between two storage operations of a deletion, with the point's name: a test hook
(``EngineConfig.test_pause_at``) that stops there; by default it returns at once."""
PAUSE_GROUP = "group-manifests-deleted"  # a group's manifests gone, its blobs not yet
PAUSE_REBASE = "rebase-blobs-written"  # a rewrite's exact blobs put, its manifest not yet
PAUSE_POINTS = (PAUSE_GROUP, PAUSE_REBASE)
# Headroom on the rebase estimate: exact blobs of a later step compress a little
# differently from the base's, and the new manifest and file-system overhead need room.
_ESTIMATE_SLACK_BYTES = 64 << 10
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class Deleter:
    """Deletes steps and runs from storage and the index, rebasing dependants first."""

    def __init__(
        self, storage: Storage, index: StepIndex, pools: Pools, restorer: Restorer,
        pause: Pause | None = None,
    ) -> None:
        self._storage = storage
        self._index = index
        self._pools = pools
        self._restorer = restorer
        self._pause = pause or _no_pause

    async def delete_step(self, key: StepKey, head: HeadArrays | None, commit: Commit) -> None:
        """Deletes ``key``, first rebasing the step that depends on it. Hidden steps that
        depend on it (``ckptd.daemon.store.retention``) are no steps to keep: they go with
        it, and the first listed step after them, if any, is the one rebased."""
        entry = self._index.get(key)
        assert entry is not None
        hidden = list(itertools.takewhile(lambda e: e.hidden, self.dependants(key)))
        if hidden:
            after = self._index.child(hidden[-1].manifest.key)
            if after is not None:
                await self._check_room(key, after)
                await self._rebase(after.manifest, head, commit)
            await self.delete_group([key, *(e.manifest.key for e in hidden)])
            return
        child = self._index.child(key)
        if child is not None:
            await self._check_room(key, child)
            try:
                await self._rebase(child.manifest, head, commit)
            except StorageError as exc:
                if not _out_of_space(exc):
                    raise
                detail = f"the rewrite failed: {exc}"
                raise StorageFullError(self._no_room(key, child, detail)) from exc
        await self._mark([key])
        await self._pools.run_io(functools.partial(self._storage.delete, [manifest_key(key)]))
        self._index.remove(key)
        await self._delete_quietly([t.blob_key for t in entry.manifest.tensors], key)
        await self._delete_quietly([pending_key(key)], key)

    async def rebase(self, key: StepKey, head: HeadArrays | None, commit: Commit) -> None:
        """Rewrites the delta ``key`` as a lossless base with the same reconstruction (its
        parent stays); refuses before writing when the storage visibly has no room."""
        entry = self._index.get(key)
        assert entry is not None and entry.manifest.parent_step is not None
        parent = StepKey(key.run, key.rank, entry.manifest.parent_step)
        await self._check_room(parent, entry)
        await self._rebase(entry.manifest, head, commit)

    async def delete_chain(self, run: str, rank: int) -> int:
        """Deletes every step of the chain; returns how many."""
        keys = [e.manifest.key for e in self._index.entries(run, rank)]
        await self.delete_group(keys)
        return len(keys)

    async def delete_group(self, keys: list[StepKey]) -> None:
        """Deletes steps of one chain that no remaining step depends on, rewriting nothing:
        markers, then manifests newest first (an older step never loses a parent it needs
        while a newer one still exists), then all blobs, then the markers. Raises
        ``ValueError`` (before deleting anything) when a step outside ``keys`` is a delta
        on one of them."""
        entries = [self._index.get(key) for key in keys]
        present = [e for e in entries if e is not None]
        if not present:
            return
        group = {e.manifest.key for e in present}
        for entry in present:
            child = self._index.child(entry.manifest.key)
            if child is not None and child.manifest.key not in group:
                raise ValueError(f"step {child.manifest.key} depends on step "
                                 f"{entry.manifest.key}, which is not deletable alone")
        ordered = sorted(group, key=lambda key: key.step)
        await self._mark(ordered)
        manifests = [manifest_key(key) for key in reversed(ordered)]
        await self._pools.run_io(functools.partial(self._storage.delete, manifests))
        for key in ordered:
            self._index.remove(key)
        await self._pause(PAUSE_GROUP)
        # No manifest is left to need them: each step directory's blobs, then its marker,
        # in parallel over the I/O pool (a local delete syncs each directory it touches).
        await asyncio.gather(*(self._delete_quietly(
            [t.blob_key for t in e.manifest.tensors]
            + ([hidden_key(e.manifest.key)] if e.hidden else []), e.manifest.key)
            for e in present))
        await asyncio.gather(*(self._delete_quietly([pending_key(key)], key)
                               for key in ordered))

    def dependants(self, key: StepKey) -> list[IndexEntry]:
        """The steps that need ``key`` to restore: its child delta, that one's, and so on
        up to the next base (oldest first)."""
        found = []
        step = key
        while (child := self._index.child(step)) is not None:
            found.append(child)
            step = child.manifest.key
        return found

    async def _mark(self, keys: list[StepKey]) -> None:
        """Puts the ``pending`` marker of each step about to lose its manifest."""
        put = self._storage.put
        await asyncio.gather(*(
            self._pools.run_io(functools.partial(put, pending_key(key), b"")) for key in keys))

    async def _check_room(self, key: StepKey, child: IndexEntry) -> None:
        """Refuses, before writing, a rebase the storage visibly has no room for."""
        free = await self._pools.run_io(self._storage.free_bytes)
        if free is None:
            return
        needed = self._rebase_estimate(child)
        if free < needed:
            raise StorageFullError(self._no_room(
                key, child, f"which needs about {_mib(needed)}; {self._storage.url} has "
                f"{_mib(free)} free"))

    def _rebase_estimate(self, child: IndexEntry) -> int:
        """Bytes a rebase of ``child`` writes: its tensors as exact blobs, about what the
        chain's base (the same table, exactly encoded) stores, plus its manifest."""
        base = self._index.plan(child.manifest.key)[0]
        return base.stored_bytes * 17 // 16 + child.manifest_bytes + _ESTIMATE_SLACK_BYTES

    def _no_room(self, key: StepKey, child: IndexEntry, detail: str) -> str:
        group = [self._index.get(key), *self.dependants(key)]
        steps = [entry.manifest.key.step for entry in reversed(group) if entry is not None]
        freed = sum(entry.stored_bytes for entry in group if entry is not None)
        return (
            f"cannot delete step {key}: step {child.manifest.key.step} is a delta on it and "
            f"must first be rewritten as a lossless base, {detail}. Nothing was deleted. To "
            f"free space without writing, delete step {key.step} with the steps that depend "
            f"on it, newest first: steps {steps} ({_mib(freed)}; ckptd rm {key.run} --rank "
            f"{key.rank} --step {key.step} --with-dependants), or a step nothing depends on "
            "(the latest of a chain, or one followed by a base)"
        )

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
            # One durability batch, as a save's blobs (``Storage.put_batched``).
            sync = functools.partial(self._storage.sync, [e.blob_key for e in entries])
            await self._pools.run_io(sync)
            await self._pause(PAUSE_REBASE)
        except asyncio.CancelledError:
            raise  # shutting down: storage may hang, so leave the new blobs to the next start
        except BaseException:
            keys = [blob_key(child.key, i, tag) for i in range(len(arrays))]
            await self._delete_quietly(keys, child.key)
            raise
        # The commit point. Once the manifest put has started, the stored manifest may name
        # the new blobs whatever this coroutine sees: a cancellation does not stop the I/O
        # thread's put, and a failed put may have renamed it into place. So nothing is
        # deleted from here on a failure; the next start removes the blobs no manifest names.
        # Except a lost lease: the check before the put raises it, so no put was issued, and
        # on shared storage no start would remove the new blobs (a full copy of the step).
        try:
            await asyncio.shield(commit(rebased))
        except ChainLeasedError:
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
        # Durable before the commit: the caller syncs the whole rewrite's blobs at once.
        await self._pools.run_io(functools.partial(self._storage.put_batched, key, blob))
        return TensorEntry(spec, EXACT, key, len(blob), digest)

    async def _renumber_descendants(self, base: Manifest, commit: Commit) -> None:
        """Rewrites base_step/chain_depth of the deltas that now hang off ``base``. These
        fields are informational (restore follows parent pointers), so a failure here is
        logged, not raised; except a lost chain lease (``ChainLeasedError`` from the late
        put's check): nothing more may be written under it, so the delete stops here, the
        rebased child a base and the deleted step still there."""
        parent = base
        while (entry := self._index.child(parent.key)) is not None:
            updated = dataclasses.replace(
                entry.manifest, base_step=base.key.step, chain_depth=parent.chain_depth + 1
            )
            try:
                await commit(updated)
            except ChainLeasedError:
                raise
            except Exception as exc:
                log.warning("cannot update chain fields %s",
                            step_fields(updated.key, error=str(exc)))
                return
            parent = updated

    async def _delete_quietly(self, keys: list[str], key: StepKey) -> None:
        if not keys:
            return
        try:
            await self._pools.run_io(functools.partial(self._storage.delete, keys))
        except Exception as exc:
            log.warning("cannot delete blobs; removed at next start %s",
                        step_fields(key, count=len(keys), error=str(exc)))


async def _no_pause(point: str) -> None:
    return None


def _out_of_space(exc: BaseException) -> bool:
    """Whether a storage error was caused by a full file system or quota."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno in _NO_SPACE:
            return True
        cause = cause.__cause__
    return False


def _mib(count: int) -> str:
    return f"{count / (1 << 20):.1f} MiB"
