"""Serving restores: the restore budget and the verified reconstruction of one step.

A restore materializes a whole step — read-only views of the chain head's arrays (never
modified in place, so not copied, and verified when they became the head, so not hashed
again) when the step is the head, otherwise rebuilt from storage along its plan and
verified — and holds it until the transport has sent it; or (``streaming``) hands the
arrays over one at a time while they are rebuilt and verifies the step before its iterator
ends, so that the transport writes each while the next are read and decoded. ``Restores``
bounds how many bytes of those are held at once (``max_restore_bytes``, under each
identity's share, FIFO among waiters) so that clients that do not read cannot grow the
daemon's memory; a restore larger than the whole budget reserves all of it and runs alone.
Used by ``Engine.restoring`` on the event loop; the engine passes how to find a step's
in-memory head (and mark it used), so this module knows nothing of chains.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable

import numpy as np
from ckptd.daemon.domain import RestoredCheckpoint, StepKey, StreamedCheckpoint
from ckptd.daemon.engine.budget import ByteBudget
from ckptd.daemon.errors import CorruptCheckpointError, StepNotFoundError
from ckptd.daemon.store.index import IndexEntry
from ckptd.daemon.store.manifest import Manifest
from ckptd.daemon.store.repository import Repository
from ckptd.daemon.store.restore import MissingBlobError
from ckptd.protos.checksum import TensorsChecksum

HeadOf = Callable[[StepKey], "tuple[np.ndarray, ...] | None"]
"""The arrays of ``key``'s reconstruction if it is its chain's head in memory, else None."""
# A restore that finds its plan replaced by a concurrent delete or rebase plans again.
_ATTEMPTS = 3


class Restores:
    """The restore budget and the materialization of steps for restores."""

    def __init__(self, repository: Repository, capacity_bytes: int, share: float) -> None:
        self._repository = repository
        self.budget = ByteBudget(capacity_bytes, share=share)

    @contextlib.asynccontextmanager
    async def serving(
        self, key: StepKey, head_of: HeadOf, *, identity: str = ""
    ) -> AsyncIterator[RestoredCheckpoint]:
        """Yields the verified reconstruction of ``key`` while its raw size is reserved in
        the restore budget under ``identity``'s share (waiting for room)."""
        entry = self._repository.entry(key)
        nbytes = min(entry.manifest.raw_bytes, self.budget.capacity_bytes)
        await self.budget.acquire(nbytes, wait=True, what=f"restore {key}", identity=identity)
        try:
            yield await self._materialize(key, head_of)
        finally:
            self.budget.release(nbytes, identity)

    @contextlib.asynccontextmanager
    async def streaming(
        self, key: StepKey, head_of: HeadOf, *, identity: str = ""
    ) -> AsyncIterator[StreamedCheckpoint]:
        """Like ``serving``, but yields the step before it is rebuilt: its arrays come one
        at a time as they are decoded (``StreamedCheckpoint``), so the transport writes
        each while the next are read and decoded. Same budget, same checks: every blob's
        before it is decoded, the step's checksum before the iterator ends."""
        manifest = self._repository.entry(key).manifest
        nbytes = min(manifest.raw_bytes, self.budget.capacity_bytes)
        await self.budget.acquire(nbytes, wait=True, what=f"restore {key}", identity=identity)
        try:
            async with contextlib.aclosing(self._stream(key, manifest, head_of)) as arrays:
                yield StreamedCheckpoint(key, manifest.specs, arrays, manifest.metadata,
                                         manifest.checksum)
        finally:
            self.budget.release(nbytes, identity)

    async def _stream(
        self, key: StepKey, manifest: Manifest, head_of: HeadOf
    ) -> AsyncGenerator[np.ndarray, None]:
        head = head_of(key)
        if head is not None:
            for array in self._repository.head_views(head):
                yield array
            return
        checksum = TensorsChecksum()
        done, reread = 0, False
        for _attempt in range(_ATTEMPTS):
            entry = self._repository.entry(key)
            if entry.manifest.checksum != manifest.checksum:
                # Replaced by another save of the same step: the arrays sent are not its.
                break
            try:
                async for array in self._repository.stream(key, checksum, done):
                    done += 1
                    yield array
            except MissingBlobError as exc:
                # The arrays already sent are the same whatever the plan (a rebase keeps
                # the reconstruction), so the new plan resumes at ``done``.
                reread = await self._plan_again(key, entry, exc, reread)
                continue
            if checksum.hexdigest() != manifest.checksum:
                # A raw exact blob is left to this checksum (``Restorer.stream``): name it.
                await self._repository.check_blobs(key)
                raise CorruptCheckpointError(
                    f"step {key} reconstructs to checksum {checksum.hexdigest()}, but its "
                    f"manifest records {manifest.checksum}"
                )
            return
        raise StepNotFoundError(f"step {key} changed repeatedly while being restored; retry")

    async def _materialize(self, key: StepKey, head_of: HeadOf) -> RestoredCheckpoint:
        reread = False
        for _attempt in range(_ATTEMPTS):
            entry = self._repository.entry(key)
            manifest = entry.manifest
            try:
                head = head_of(key)
                if head is not None:
                    arrays = self._repository.head_views(head)
                else:
                    arrays = await self._repository.restore(key)
            except MissingBlobError as exc:
                reread = await self._plan_again(key, entry, exc, reread)
                continue
            return RestoredCheckpoint(key, manifest.specs, arrays, manifest.metadata,
                                      manifest.checksum)
        raise StepNotFoundError(f"step {key} changed repeatedly while being restored; retry")

    async def _plan_again(
        self, key: StepKey, entry: IndexEntry, exc: MissingBlobError, reread: bool
    ) -> bool:
        """After a missing blob: a delete or rebase may have replaced the plan meanwhile,
        so plan again; re-raises ``exc`` only when the plan is still the same after the
        chain's manifests were read again. Returns whether they were."""
        if self._repository.index.get(key) is not entry:
            return reread
        if reread:
            raise exc
        # Another daemon may have rebased the chain: read its manifests again.
        await self._repository.reread_chain(key.run, key.rank)
        return True
