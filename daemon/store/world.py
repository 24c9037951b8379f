"""Worlds: which steps every rank of a run has committed, recorded once in storage.

A save may name its run's world size (``CheckpointHeader.world_size``, kept in each
manifest as ``world_size``; 0 means no world and today's per-chain behaviour). A step of
a run with a world of ``n`` ranks is *complete* once ranks ``0..n-1`` have all committed
it. That fact is recorded in storage, beside the runs and out of the step key space::

    worlds/{run}/{step:020d}.json  {"format": "ckptd.world", "version": 1, "run": ...,
                                    "step": ..., "world_size": n,
                                    "manifests": {"0": "runs/.../manifest.json", ...}}

**Who records it.** Whoever commits a rank looks for the other ranks' manifests (its index
first, then storage: a daemon sharing the prefix commits ranks this one never indexed) and,
when all are there, creates the record with ``Storage.put_if_absent``. The record is a pure
function of the (run, step, world size) and the manifests' keys, so two writers racing to
commit the last ranks, which both see every manifest, write the same bytes; one creates it,
the other finds it there. A writer that saw a rank missing while that rank was being
committed elsewhere, or a crash between the last commit and the record, leaves a complete
step without its record: ``missing_ranks`` (restores) and ``repair`` (the engine's start)
record it when they find every manifest, so the record is repaired lazily.

**What reads it.** ``missing_ranks`` answers a restore: a record means complete; without
one, the index and then storage decide (a manifest there counts unless it is void: its
writer had lost the chain's lease, ``ckptd.daemon.store.lease``), and a complete step gets
its record on the way. A record that a void manifest made look complete (written before
the fence was seen) is deleted by the next scan that finds the manifest void
(``discard_void``: at start, on a refresh, or when the chain's lease is taken).
``missing_indexed`` answers listings from memory: the records this process has seen and
its index (an index that other daemons' commits have not reached yet reports their ranks
missing until it is refreshed). A deletion of any rank's step, or retention hiding it,
deletes the step's record (``forget``): that step is no longer complete. Records are
JSON, tiny, written once.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from ckptd.daemon.domain import CheckpointHeader, StepKey
from ckptd.daemon.errors import (
    CorruptCheckpointError,
    InvalidRequestError,
    KeyNotFoundError,
    StepIncompleteError,
    StorageError,
)
from ckptd.daemon.logs import fields, get_logger, step_fields
from ckptd.daemon.storage.base import Storage
from ckptd.daemon.store.index import RunInPool, StepIndex
from ckptd.daemon.store.lease import chain_prefix, is_void, read_all
from ckptd.daemon.store.manifest import Manifest, manifest_key

FORMAT_NAME = "ckptd.world"
FORMAT_VERSION = 1
WORLDS_PREFIX = "worlds/"

log = get_logger("engine")


def world_key(run: str, step: int) -> str:
    """Key of the completion record of ``step`` of ``run``."""
    return f"{WORLDS_PREFIX}{run}/{step:020d}.json"


def parse_world_key(key: str) -> tuple[str, int] | None:
    """(run, step) of a record key; None for a key that is not one."""
    if not key.startswith(WORLDS_PREFIX) or not key.endswith(".json"):
        return None
    run, _, name = key[len(WORLDS_PREFIX):-len(".json")].rpartition("/")
    if not run or "/" in run or len(name) != 20 or not name.isdigit():
        return None
    return run, int(name)


def record_bytes(run: str, step: int, world_size: int) -> bytes:
    """The record of a complete step: the same bytes whichever writer makes it."""
    manifests = {str(rank): manifest_key(StepKey(run, rank, step)) for rank in range(world_size)}
    obj: dict[str, Any] = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "run": run,
                           "step": step, "world_size": world_size, "manifests": manifests}
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


class Worlds:
    """Completion of world steps over one ``Storage`` and the index of its manifests.

    Call order, from the event loop's thread: ``await load()`` after the index is built;
    then ``await committed(key, world_size)`` after each commit, ``missing_ranks`` and
    ``missing_indexed`` to ask, ``await forget(...)`` before a step's deletion. Storage calls
    run in ``run_io``.
    """

    def __init__(self, storage: Storage, index: StepIndex, run_io: RunInPool) -> None:
        self._storage = storage
        self._index = index
        self._run_io = run_io
        self._recorded: set[tuple[str, int]] = set()  # records seen in storage or written

    async def load(self) -> None:
        """Reads which records exist (the keys only)."""
        keys = await self._run_io(lambda: self._storage.list(WORLDS_PREFIX))
        self._recorded = {parsed for key in keys if (parsed := parse_world_key(key))}

    async def repair(self) -> int:
        """Records every complete step of the index that lacks its record; returns how
        many (a crash between a world's last commit and its record leaves one)."""
        repaired = 0
        for run, step, world_size in self._world_steps():
            if (run, step) not in self._recorded and not self._absent_in_index(
                    run, step, world_size):
                repaired += await self._record(run, step, world_size)
        return repaired

    async def committed(self, key: StepKey, world_size: int) -> bool:
        """After ``key`` is committed: records its step if every rank now has it; returns
        whether the step is known complete. A storage failure is logged, not raised: the
        save is durable already, and a missing record is repaired later."""
        try:
            return await self.is_complete(key.run, key.step, world_size)
        except Exception as exc:
            log.warning("cannot check or record a world step; repaired later %s",
                        step_fields(key, error=f"{type(exc).__name__}: {exc}"))
            return False

    async def is_complete(self, run: str, step: int, world_size: int) -> bool:
        """Like ``not missing_ranks(...)``, but stops at the first rank found missing, so
        that ranks committing one after another through one daemon cost one storage look
        each, not one per rank still to come."""
        return not await self.missing_ranks(run, step, world_size, first_only=True)

    def missing_indexed(self, run: str, step: int, world_size: int) -> tuple[int, ...]:
        """The ranks that lack ``step`` as far as this process knows (no storage call)."""
        if world_size == 0 or (run, step) in self._recorded:
            return ()
        return self._absent_in_index(run, step, world_size)

    async def missing_ranks(
        self, run: str, step: int, world_size: int, *, first_only: bool = False
    ) -> tuple[int, ...]:
        """The ranks that have not committed ``step`` (only the first with
        ``first_only``), from the record, the index, then storage; a complete step without
        a record gets it here."""
        if world_size == 0 or (run, step) in self._recorded:
            return ()
        absent = self._absent_in_index(run, step, world_size)
        if absent:  # ranks another writer may have committed, or recorded already
            if await self._exists(world_key(run, step)):
                self._recorded.add((run, step))
                return ()
            missing = []
            for rank in absent:
                if not await self._committed_in_storage(StepKey(run, rank, step)):
                    missing.append(rank)
                    if first_only:
                        break
            if missing:
                return tuple(missing)
        await self._record(run, step, world_size)
        return ()

    def latest_complete_indexed(self, run: str, rank: int) -> int | None:
        """The rank's newest world step that every rank has, as far as this process
        knows (``missing_indexed``); None without one, or when the newest step has no
        world (nothing to protect beyond the latest step)."""
        for entry in reversed(self._index.entries(run, rank)):
            manifest = entry.manifest
            if not manifest.world_size:
                return None
            if not self.missing_indexed(run, manifest.key.step, manifest.world_size):
                return manifest.key.step
        return None

    def check_header(self, header: CheckpointHeader) -> None:
        """Refuses a save whose rank lies outside its world, or whose world size differs
        from the run's latest step (any rank, as indexed here) unless it is reshardable."""
        key, size = header.key, header.world_size
        if size and key.rank >= size:
            raise InvalidRequestError(
                f"save {key}: rank {key.rank} is outside its world of {size} ranks "
                f"(world_size); ranks are 0..{size - 1}")
        latest = self._latest_of_run(key.run)
        if latest is None or header.reshardable or latest.world_size == size:
            return
        def name(n: int) -> str:
            return f"world_size {n}" if n else "no world_size"
        raise InvalidRequestError(
            f"save {key} has {name(size)} but step {latest.key.step} of rank "
            f"{latest.key.rank} of run {key.run!r} has {name(latest.world_size)}; a run keeps "
            "one world size (save to a new run, or reshard through torch.distributed."
            "checkpoint with ckptd.client.dcp)")

    async def restorable(
        self, run: str, rank: int, step: int | None, allow_incomplete: bool
    ) -> int | None:
        """The step a restore of (run, rank) serves: ``step`` if it is complete (or
        ``allow_incomplete``), else ``StepIncompleteError`` naming the missing ranks; for
        None, the latest complete step (the latest of the rank with ``allow_incomplete``).
        None when the rank has no step at all (the caller's not-found error)."""
        steps = self._index.steps(run, rank)
        if step is not None or not steps:
            if step is not None and not allow_incomplete:
                entry = self._index.get(StepKey(run, rank, step))
                size = entry.manifest.world_size if entry is not None else 0
                missing = await self.missing_ranks(run, step, size)
                if missing:
                    raise StepIncompleteError(
                        f"step {step} of run {run!r} is incomplete: ranks {list(missing)} of "
                        f"its world of {size} have not committed it; restore an earlier "
                        "step, or this rank's own copy (allow_incomplete=True)")
            return step if steps else None
        if allow_incomplete:
            return steps[-1]
        for candidate in reversed(steps):
            entry = self._index.get(StepKey(run, rank, candidate))
            size = entry.manifest.world_size if entry is not None else 0
            if await self.is_complete(run, candidate, size):
                return candidate
        raise StepIncompleteError(
            f"run {run!r} has no step that every rank committed: rank {rank}'s steps "
            f"{steps[-3:]} (of {len(steps)}) each lack a rank of the world; wait for the "
            "missing ranks, or restore this rank's own copy (allow_incomplete=True)")

    async def forget(self, run: str, steps: Iterable[int]) -> None:
        """Deletes the records of ``steps`` (call before deleting a rank's copy of them:
        from then on they are not complete)."""
        keys = [world_key(run, step) for step in steps]
        if not keys:
            return
        await self._run_io(lambda: self._storage.delete(keys))
        self._recorded.difference_update((run, step) for step in steps)

    async def discard_void(self, manifests: Iterable[Manifest]) -> None:
        """Deletes the records of the world steps that void manifests (``scan``'s ``void``)
        claim: a rank whose copy is void never committed the step, so a record made while
        that manifest looked committed (before the fence was seen) is wrong. Best effort:
        a record left by a failed delete is found again at the next scan."""
        by_run: dict[str, set[int]] = {}
        for manifest in manifests:
            if manifest.world_size:
                by_run.setdefault(manifest.key.run, set()).add(manifest.key.step)
        for run, steps in by_run.items():
            try:
                await self.forget(run, sorted(steps))
            except StorageError as exc:
                log.warning("cannot delete the world records of void steps %s",
                            fields(run=run, steps=sorted(steps), error=str(exc)))

    def _latest_of_run(self, run: str) -> Manifest | None:
        latest: Manifest | None = None
        for rank in self._index.ranks(run):
            entries = self._index.entries(run, rank)
            if entries and (latest is None or entries[-1].manifest.key.step > latest.key.step):
                latest = entries[-1].manifest
        return latest

    def _absent_in_index(self, run: str, step: int, world_size: int) -> tuple[int, ...]:
        return tuple(rank for rank in range(world_size)
                     if self._index.get(StepKey(run, rank, step)) is None)

    def _world_steps(self) -> set[tuple[str, int, int]]:
        return {(run, entry.manifest.key.step, entry.manifest.world_size)
                for run, rank in self._index.chains()
                for entry in self._index.entries(run, rank) if entry.manifest.world_size}

    async def _record(self, run: str, step: int, world_size: int) -> int:
        """Creates the record (1) unless another writer did first (0)."""
        data = record_bytes(run, step, world_size)
        created = await self._run_io(
            lambda: self._storage.put_if_absent(world_key(run, step), data))
        self._recorded.add((run, step))
        if created:
            log.info("world step complete %s", fields(run=run, step=step, world_size=world_size))
        return int(created)

    async def _committed_in_storage(self, key: StepKey) -> bool:
        """Whether another writer committed ``key``: its manifest is in storage, readable,
        and not void (committed by a writer that had lost the chain's lease, which the
        chain's next holder deletes: counting it would record a step that rank lacks)."""
        where = manifest_key(key)

        def read() -> bool:
            try:
                manifest = Manifest.from_bytes(self._storage.get(where), where)
            except (KeyNotFoundError, CorruptCheckpointError):
                return False  # absent, or damaged: not a copy a restore could serve
            leases = read_all(self._storage, chain_prefix(key.run, key.rank))
            return manifest.key == key and not is_void(
                manifest.lease_generation, key.step, leases.get((key.run, key.rank), ()))

        return await self._run_io(read)

    async def _exists(self, key: str) -> bool:
        try:
            await self._run_io(lambda: self._storage.size(key))
        except KeyNotFoundError:
            return False
        return True


__all__ = ["WORLDS_PREFIX", "Worlds", "parse_world_key", "record_bytes", "world_key"]
