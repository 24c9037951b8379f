"""``Repository``: the committed checkpoints of one storage location, for every reader.

The engine (inside the daemon) and the CLI's direct access to storage
(``ckptd.daemon.cli.storage_catalog``) hold one each, so that they list, restore, commit
and delete through the very same code. It owns the index of committed steps
(``StepIndex``, rebuilt from the manifests by ``load``), restore plans and their
verification (``Restorer``) and deletion with rebasing (``Deleter``). It holds nothing of
a chain in memory: a caller that keeps a step's reconstruction passes it in where it
saves work (``delete_step(..., head=...)``) and updates its own state afterwards.

Call order, from one event loop's thread: ``await load()`` once (a sole writer then
``quarantine``s what it found damaged); then any of the queries (``index``), ``restore``,
``mark_pending`` → blob puts → ``commit`` → ``clear_pending`` (a save),
``delete_step``/``delete_chain``, and the quarantine's ``quarantined`` and
``delete_quarantined``. Callers serialise writes to one (run, rank) themselves (the
engine's chain lock and its lease, ``ckptd.daemon.store.lease``). Blocking work runs in the
given ``Pools``.

Many daemons on one storage: the index is a cache of storage. ``refresh`` brings in what
other writers committed (and drops what they deleted) for every chain ``held`` does not
name (the chains this process writes are authoritative in memory: a refresh that listed
storage just before one of its own commits must not drop that commit); ``scan_chain``
and ``replace_chain`` re-read one chain, when its lease is taken or a restore finds its
plan gone.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
from collections.abc import AsyncIterator, Callable, Sequence

import numpy as np
from ckptd.daemon.domain import RetentionPolicy, StepKey
from ckptd.daemon.errors import RunNotFoundError, StepExistsError, StepNotFoundError
from ckptd.daemon.logs import get_logger, step_fields
from ckptd.daemon.pools import Pools
from ckptd.daemon.storage.base import Storage
from ckptd.daemon.store.deletion import Deleter, HeadArrays, Pause
from ckptd.daemon.store.index import ChainKey, IndexEntry, ScanResult, StepIndex, scan
from ckptd.daemon.store.manifest import Manifest, hidden_key, manifest_key, pending_key
from ckptd.daemon.store.quarantine import (
    DamagedStep,
    QuarantinedStep,
    delete_quarantined,
    list_quarantined,
    new_tag,
    quarantine,
)
from ckptd.daemon.store.restore import Restorer
from ckptd.daemon.store.retention import load_policies, store_policy
from ckptd.daemon.store.world import Worlds
from ckptd.protos.checksum import TensorsChecksum
from ckptd.protos.records import StepInfo

__all__ = ["BeforePut", "HeadArrays", "Repository"]
log = get_logger("engine")
BeforePut = Callable[[int], None]
"""Called in the storage thread with a step just before its manifest is put (created or
rewritten): the writer's last lease check (``lease.recheck_if_late``); what it raises stops
the put."""


class Repository:
    """Index, restore, commit and delete over one ``Storage``."""

    def __init__(
        self,
        storage: Storage,
        pools: Pools,
        pause: Pause | None = None,
        held: Callable[[str, int], bool] | None = None,
    ) -> None:
        """``pause``: the deletions' test hook (``ckptd.daemon.store.deletion.Pause``).
        ``held(run, rank)`` says whether this process writes that chain (holds its lease);
        ``refresh`` leaves those chains' entries alone. None: it writes none."""
        self.storage = storage
        self.index = StepIndex()
        self._held = held or (lambda run, rank: False)
        self._pools = pools
        self._restorer = Restorer(storage, pools)
        self._deleter = Deleter(storage, self.index, pools, self._restorer, pause)
        self.worlds = Worlds(storage, self.index, pools.run_io)

    async def load(self) -> ScanResult:
        """(Re)builds the index from every readable manifest; returns the scan, whose
        ``garbage`` only a sole writer may delete (a live daemon's save looks the same)."""
        found = await scan(self.storage, self._pools.run_io)
        self.index.clear()
        for entry in found.entries:
            self.index.add(entry)
        await self.worlds.load()
        await self.worlds.discard_void(found.void)
        return found

    async def refresh(self) -> None:
        """Re-reads what is committed in storage (reading only manifests it does not know)
        into the index, except for the chains this process holds."""
        known = {manifest_key(e.manifest.key): e for run, rank in self.index.chains()
                 for e in self.index.entries(run, rank)}
        found = await scan(self.storage, self._pools.run_io, known=known)
        await self.worlds.discard_void(found.void)
        by_chain: dict[ChainKey, list[IndexEntry]] = {}
        for entry in found.entries:
            by_chain.setdefault((entry.manifest.key.run, entry.manifest.key.rank), []).append(
                entry)
        for chain in set(self.index.chains()) | set(by_chain):
            if not self._held(*chain):
                self.replace_chain(chain, by_chain.get(chain, []))

    async def scan_chain(self, run: str, rank: int) -> ScanResult:
        """One chain's committed steps in storage, read afresh (nothing cached); the world
        records its void manifests claimed are deleted."""
        found = await scan(self.storage, self._pools.run_io, chain=(run, rank))
        await self.worlds.discard_void(found.void)
        return found

    async def reread_chain(self, run: str, rank: int) -> None:
        """Re-reads one chain from storage into the index unless this process holds it
        (another writer may have rewritten a manifest the index still caches)."""
        if not self._held(run, rank):
            found = await self.scan_chain(run, rank)
            if not self._held(run, rank):
                self.replace_chain((run, rank), found.entries)

    def replace_chain(self, chain: ChainKey, entries: Sequence[IndexEntry]) -> None:
        """Makes ``entries`` the chain's indexed steps (hidden ones included)."""
        for entry in self.index.entries(*chain):
            self.index.remove(entry.manifest.key)
        for entry in entries:
            self.index.add(entry)

    async def quarantine(self, damaged: Sequence[DamagedStep]) -> list[QuarantinedStep]:
        """Moves each damaged step directory to the quarantine area; only a sole writer may
        (a live daemon's directories are never damaged, but a reader cannot know that)."""
        tag = new_tag()
        moved = []
        for step in damaged:
            moved.append(await self._pools.run_io(functools.partial(
                quarantine, self.storage, step, tag)))
        return moved

    async def quarantined(self) -> list[QuarantinedStep]:
        """Every step directory in the quarantine area."""
        return await self._pools.run_io(functools.partial(list_quarantined, self.storage))

    async def delete_quarantined(self, entries: Sequence[QuarantinedStep]) -> None:
        """Deletes quarantined step directories (an operator's decision)."""
        await self._pools.run_io(
            functools.partial(delete_quarantined, self.storage, list(entries)))

    def entry(self, key: StepKey) -> IndexEntry:
        """The committed step ``key`` as users see it; raises a not-found error naming what
        exists (or, for a hidden step, that retention removed it)."""
        entry = self.index.visible(key)
        if entry is None:
            raise self.not_found(key)
        return entry

    async def restore(self, key: StepKey) -> tuple[np.ndarray, ...]:
        """The verified reconstruction of ``key``, rebuilt along its plan from storage."""
        return await self._restorer.restore(self.index.plan(key))

    def stream(
        self, key: StepKey, checksum: TensorsChecksum, start: int = 0
    ) -> AsyncIterator[np.ndarray]:
        """``key``'s arrays from tensor ``start`` on, rebuilt along its plan one by one as
        they are decoded and folded into ``checksum`` (``Restorer.stream``)."""
        return self._restorer.stream(self.index.plan(key), checksum, start)

    async def check_blobs(self, key: StepKey) -> None:
        """Hashes every blob a restore of ``key`` uses against its manifest; raises
        ``CorruptCheckpointError`` naming the first that fails (``Restorer.check_blobs``:
        after a streamed restore's checksum mismatch, which blob it was)."""
        await self._restorer.check_blobs(self.index.plan(key))

    def head_views(self, arrays: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
        """Read-only views of a chain head's arrays (``Restorer.head_views``: no copy, and
        no second hash of what its save or restore already verified)."""
        return self._restorer.head_views(arrays)

    async def mark_pending(self, key: StepKey) -> None:
        """Puts the step's ``pending`` marker: call it before the first blob of a save, so
        that until the commit the directory is provably uncommitted (start-up removes it).
        The marker is empty, so that it fits on a full disk."""
        await self._pools.run_io(functools.partial(self.storage.put, pending_key(key), b""))

    async def clear_pending(self, key: StepKey) -> None:
        """Removes the step's marker after its manifest is committed or its keys are gone.
        Best effort: a marker left beside a readable manifest is garbage at the next start."""
        try:
            await self._pools.run_io(functools.partial(self.storage.delete, [pending_key(key)]))
        except Exception as exc:
            log.warning("cannot remove pending marker; removed at next start %s",
                        step_fields(key, error=str(exc)))

    async def commit(self, manifest: Manifest, *, before_put: BeforePut | None = None,
                     ) -> IndexEntry:
        """Creates ``manifest`` (the commit point: its blobs must be durable already) and
        indexes it; the step exists from here on. The manifest is created only where none
        exists (``put_if_absent``): ``StepExistsError`` if another writer committed it.
        ``before_put`` runs in the storage thread just before the put (the writer's last
        lease check, ``lease.recheck_if_late``); what it raises stops the commit."""
        data = manifest.to_bytes()
        created = await self._put_manifest(manifest.key, data, self.storage.put_if_absent,
                                           before_put)
        if not created and not await self._stored_is(manifest.key, data):
            raise StepExistsError(
                f"step {manifest.key} was committed by another writer meanwhile "
                f"({manifest_key(manifest.key)} exists); this save is not committed"
            )
        return self._indexed(manifest, len(data))

    async def rewrite(self, manifest: Manifest, *, before_put: BeforePut | None = None,
                      ) -> IndexEntry:
        """Replaces a committed step's manifest with ``manifest`` (a rebase: same step and
        checksum, freshly named blobs) and indexes it; the one manifest overwrite, made
        only by the chain's writer. ``before_put`` as for ``commit``: a rewrite is a
        manifest put under the chain's lease like a commit, as late as a commit can be."""
        data = manifest.to_bytes()
        await self._put_manifest(manifest.key, data, self.storage.put, before_put)
        return self._indexed(manifest, len(data))

    async def _put_manifest(
        self, key: StepKey, data: bytes, put: Callable[[str, bytes], bool | None],
        before_put: BeforePut | None,
    ) -> bool | None:
        def checked_put() -> bool | None:
            if before_put is not None:
                before_put(key.step)
            return put(manifest_key(key), data)

        return await self._pools.run_io(checked_put)

    async def _stored_is(self, key: StepKey, data: bytes) -> bool:
        """Whether the manifest stored for ``key`` is ``data`` byte for byte: a conditional
        put retried after a lost response (S3, ``Storage.put_if_absent``) may find its own
        first attempt and report the key taken. ``data`` names this save's own blobs, so
        no other writer's manifest equals it."""
        try:
            read = functools.partial(self.storage.get, manifest_key(key))
            stored = await self._pools.run_io(read)
        except Exception:  # unreadable or gone: not shown to be ours
            return False
        return stored == data

    def _indexed(self, manifest: Manifest, nbytes: int) -> IndexEntry:
        entry = IndexEntry(manifest, nbytes)
        self.index.add(entry)
        return entry

    def step_infos(self, run: str, rank: int) -> list[StepInfo]:
        """The committed steps of one chain, oldest first, each with the ranks of its
        world that this process knows lack it (``Worlds.missing_indexed``)."""
        return [dataclasses.replace(info, missing_ranks=self.worlds.missing_indexed(
                    run, info.step, info.world_size)) if info.world_size else info
                for info in self.index.step_infos(run, rank)]

    async def delete_step(
        self, key: StepKey, head: HeadArrays | None = None, *,
        before_put: BeforePut | None = None,
    ) -> None:
        """Deletes ``key``, first rebasing the step that depends on it (from ``head``, the
        caller's in-memory reconstruction of some step, when it is that dependant);
        ``before_put`` runs before each manifest the rebase rewrites (``rewrite``)."""
        await self._forget_worlds([key])
        await self._deleter.delete_step(
            key, head, functools.partial(self.rewrite, before_put=before_put))

    async def delete_chain(self, run: str, rank: int) -> int:
        """Deletes every step of (run, rank); returns how many."""
        steps = self.index.steps(run, rank)
        await self._forget_worlds([StepKey(run, rank, step) for step in steps])
        return await self._deleter.delete_chain(run, rank)

    async def delete_group(self, keys: list[StepKey]) -> None:
        """Deletes steps that no remaining step depends on, rewriting nothing (retention's
        deletion groups, ``ckptd.daemon.store.retention``)."""
        await self._forget_worlds(keys)
        await self._deleter.delete_group(keys)

    async def hide(self, keys: list[StepKey]) -> None:
        """Hides steps retention dropped that a kept step still restores through: puts
        each one's empty ``hidden`` marker (atomic), then marks it in the index. A hidden
        world step is no longer complete: its record goes first, as for a deletion."""
        await self._forget_worlds(keys)
        put = self.storage.put
        await asyncio.gather(*(self._pools.run_io(functools.partial(put, hidden_key(key), b""))
                               for key in keys))
        for key in keys:
            self.index.hide(key)

    async def _forget_worlds(self, keys: Sequence[StepKey]) -> None:
        """Deletes the completion records of the world steps among ``keys`` (a step one
        rank no longer has is not complete), before any of them is deleted."""
        by_run: dict[str, list[int]] = {}
        for key in keys:
            entry = self.index.get(key)
            if entry is not None and entry.manifest.world_size:
                by_run.setdefault(key.run, []).append(key.step)
        for run, steps in by_run.items():
            await self.worlds.forget(run, steps)

    async def rebase(
        self, key: StepKey, head: HeadArrays | None = None, *,
        before_put: BeforePut | None = None,
    ) -> None:
        """Rewrites the delta ``key`` as a lossless base (same checksum), so that the steps
        before it are no longer needed by it (retention's one rewrite per commit);
        ``before_put`` as for ``delete_step``."""
        await self._deleter.rebase(
            key, head, functools.partial(self.rewrite, before_put=before_put))

    async def policies(self) -> dict[str, RetentionPolicy]:
        """Every run's stored retention policy."""
        return await self._pools.run_io(functools.partial(load_policies, self.storage))

    async def store_policy(self, run: str, policy: RetentionPolicy) -> None:
        """Stores ``run``'s retention policy (one atomic put)."""
        await self._pools.run_io(functools.partial(store_policy, self.storage, run, policy))

    def not_found(self, key: StepKey) -> LookupError:
        """The error for a missing ``key``: which ranks or nearby steps exist instead."""
        steps = self.index.steps(key.run, key.rank)
        if self.index.get(key) is not None:  # hidden
            return StepNotFoundError(
                f"step {key} was removed by the run's retention policy; its data stays "
                f"stored only while a kept step restores through it. Kept steps nearby: "
                f"{self.index.nearby(key.run, key.rank, key.step)} (latest {steps[-1]}); "
                f"set a policy that keeps the steps you need before they are saved")
        if not steps:
            ranks = self.index.ranks(key.run)
            where = f"ranks with steps: {ranks}" if ranks else f"known runs: {self.known_runs()}"
            return RunNotFoundError(f"run {key.run!r} rank {key.rank} has no saved steps; {where}")
        nearby = self.index.nearby(key.run, key.rank, key.step)
        return StepNotFoundError(
            f"step {key} does not exist; nearby steps: {nearby} (latest {steps[-1]})"
        )

    def run_not_found(self, run: str) -> RunNotFoundError:
        """The error for a run without steps, naming the runs that exist."""
        return RunNotFoundError(f"run {run!r} has no saved steps; known runs: {self.known_runs()}")

    def known_runs(self) -> str:
        """Up to ten run names, for error messages."""
        runs = sorted({run for run, _ in self.index.chains()})
        shown = ", ".join(runs[:10]) + (f" and {len(runs) - 10} more" if len(runs) > 10 else "")
        return shown or "none"
