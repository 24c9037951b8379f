"""``Catalog`` over a storage location, through the same ``Repository`` the engine uses.

Nothing here talks to a daemon: the index is rebuilt from the manifests
(``Repository.load``, the same code a starting daemon runs), restores are verified (every
blob's xxh3_64 and the step's xxh3_128) and deletes rebase a dependant step first. Unlike
``Engine.start`` this never deletes garbage or temporaries (a live daemon's save in
progress looks exactly like garbage) and never moves damaged step directories to
quarantine: it reports them (``damaged``), and lists and deletes what a daemon already
quarantined (``quarantined``, ``delete_quarantined``; deleting claims the storage too).

Writing (``delete_*``) while a daemon serves the same storage would leave the daemon's
index and head reconstruction stale, so it first claims the storage's one-writer lock
(``Storage.claim``), which a serving daemon holds: the deletion is refused, naming the
holder; delete through the daemon (``--target``) instead. An object store has no such
lock (``Storage.shared``): there each deletion takes the chain's writer lease
(``ckptd.daemon.store.lease``) for as long as it runs, renewed meanwhile and checked again
before a late manifest rewrite (``ckptd.daemon.cli.rm_lease``), so it is refused while any
daemon writes that chain, stops (rewriting nothing more) if it loses the chain, and
releases it after. Reading is safe at any time (manifests are the commit point).

The engine's code is asynchronous; this class runs it on a private event loop, one call at
a time, from the caller's thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import re
import socket
from collections.abc import Awaitable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

from ckptd.daemon.cli.catalog import Catalog, ProgressCallback, StepDetail, TensorRow
from ckptd.daemon.cli.rm_lease import RmLeases
from ckptd.daemon.domain import RestoredCheckpoint, RunInfo, StepKey
from ckptd.daemon.engine.lease import LeaseClocks
from ckptd.daemon.engine.validation import check_key, check_run_name
from ckptd.daemon.errors import ChainLeasedError, StorageError
from ckptd.daemon.pools import Pools
from ckptd.daemon.storage import Storage, open_storage
from ckptd.daemon.store.index import IndexEntry, StepIndex
from ckptd.daemon.store.quarantine import DamagedStep, QuarantinedStep
from ckptd.daemon.store.repository import Repository
from ckptd.protos.records import StepInfo

T = TypeVar("T")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# Enough threads to overlap reads with decoding; the CLI is one short-lived process.
_CODEC_WORKERS = max(1, min(4, os.cpu_count() or 1))
_IO_WORKERS = 4
# How long a direct deletion's chain leases last past their last renewal: how long a daemon
# waits for the chains of a deletion that died holding them (renewed every third of it).
RM_LEASE_TTL_S = 60.0


def local_path(url: str) -> Path | None:
    """The directory a plain path or ``file://`` URL names; None for other schemes."""
    match = _SCHEME.match(url)
    if match is None:
        return Path(url)
    if match.group(1).lower() != "file":
        return None
    path = url[match.end() :]
    return Path(path[len("localhost") :] if path.startswith("localhost/") else path)


class StorageCatalog(Catalog):
    """Reads (and, with care, deletes) checkpoints straight from storage."""

    direct = True

    def __init__(self, storage: Storage, *, lease_ttl_s: float = RM_LEASE_TTL_S,
                 lease_clocks: LeaseClocks | None = None) -> None:
        """``lease_ttl_s`` and ``lease_clocks``: of the chain leases a deletion takes on
        shared storage (tests pass clocks they advance themselves)."""
        self._storage = storage
        self.location = f"storage {storage.url}"
        self._loop = asyncio.new_event_loop()
        self._pools = Pools(_CODEC_WORKERS, _IO_WORKERS)
        self._repository = Repository(storage, self._pools)
        self._loaded = False
        self._damaged: list[DamagedStep] = []
        self._closed = False
        self._claimed = False
        self._lease_ttl_s = lease_ttl_s
        self._lease_clocks = lease_clocks or LeaseClocks()

    @classmethod
    def open(cls, url: str) -> StorageCatalog:
        """Opens ``url``; a local directory must already exist (opening never creates it,
        so a mistyped path is reported instead of silently listing nothing)."""
        path = local_path(url)
        if path is not None and not path.is_dir():
            raise StorageError(
                f"storage directory {path} does not exist (or is not a directory); pass the "
                "directory the daemon serves (its --storage)"
            )
        return cls(open_storage(url))

    def describe(self) -> list[tuple[str, str]]:
        return [("storage_url", self._storage.url), ("access", "direct (no daemon)")]

    def list_runs(self) -> list[RunInfo]:
        """The runs, each with its stored retention policy (a daemon's ``--retention-*``
        default is not in storage: shown only through the daemon)."""
        infos = self._get_index().run_infos()
        policies = self._run(self._repository.policies())
        return [dataclasses.replace(info, retention=policies.get(info.run)) for info in infos]

    def list_steps(self, run: str, rank: int) -> list[StepInfo]:
        check_key(run, rank)
        self._get_index()
        infos = self._repository.step_infos(run, rank)
        if not infos:
            raise self._not_found(StepKey(run, rank, 0))
        return infos

    def step_detail(self, key: StepKey) -> StepDetail:
        manifest = self._entry(key).manifest
        rows = tuple(TensorRow(t.spec, t.encoding, t.blob_bytes) for t in manifest.tensors)
        return StepDetail(key, rows, dict(manifest.metadata), manifest.checksum)

    def restore(
        self, key: StepKey, on_progress: ProgressCallback | None = None
    ) -> RestoredCheckpoint:
        manifest = self._entry(key).manifest
        arrays = self._run(self._repository.restore(key))
        if on_progress is not None:
            on_progress(manifest.raw_bytes)
        return RestoredCheckpoint(key, manifest.specs, arrays, manifest.metadata,
                                  manifest.checksum)

    def delete_step(self, key: StepKey) -> int:
        self._claim()
        self._entry(key)
        with self._leased([(key.run, key.rank)]) as leases:
            before_put = None if leases is None else leases.before_put(key.run, key.rank)
            try:
                self._run(self._renewing(leases, self._repository.delete_step(
                    key, before_put=before_put)))
            except ChainLeasedError as exc:
                raise ChainLeasedError(
                    f"step {key} was not deleted and no step was changed (each restores as "
                    f"before): {exc}. Delete it again once the chain is free, or through the "
                    "daemon that writes it (--target)") from exc
        return 1

    def delete_run(self, run: str) -> int:
        check_run_name(run)
        self._claim()
        ranks = self._get_index().ranks(run)
        if not ranks:
            raise self._repository.run_not_found(run)
        deleted: list[int] = []
        count = 0
        with self._leased([(run, rank) for rank in ranks]) as leases:
            for rank in ranks:
                try:
                    if leases is not None:  # rewrites nothing: checked once, before it starts
                        leases.check(run, rank)
                except ChainLeasedError as exc:
                    done = f"ranks {deleted} of run {run!r} were deleted; " if deleted else ""
                    raise ChainLeasedError(f"{done}rank {rank} and the ranks after it were "
                                           f"not: {exc}") from exc
                count += self._run(self._renewing(leases,
                                                  self._repository.delete_chain(run, rank)))
                deleted.append(rank)
        return count

    def damaged(self) -> list[DamagedStep]:
        self._get_index()
        return list(self._damaged)

    def quarantined(self) -> list[QuarantinedStep]:
        return self._run(self._repository.quarantined())

    def delete_quarantined(self, entries: list[QuarantinedStep]) -> None:
        self._claim()
        self._run(self._repository.delete_quarantined(entries))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._loop.run_until_complete(self._pools.shutdown())
        finally:
            self._loop.close()
            self._storage.close()

    # -- internals ------------------------------------------------------------------------

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self._loop.run_until_complete(coro)

    def _get_index(self) -> StepIndex:
        if not self._loaded:
            self._damaged = self._run(self._repository.load()).damaged
            self._loaded = True
        return self._repository.index

    def _claim(self) -> None:
        """Takes the storage for writing (refused while a daemon serves it), then drops the
        index: one read before the claim may miss steps a daemon committed since, and a
        deletion must see every child of what it deletes."""
        if not self._claimed:
            self._storage.claim(f"ckptd rm (pid {os.getpid()} on {socket.gethostname()})")
            self._claimed = True
            self._loaded = False

    @contextlib.contextmanager
    def _leased(self, chains: list[tuple[str, int]]) -> Iterator[RmLeases | None]:
        """Holds the chains' writer leases on shared storage (refused, naming the holder,
        while a daemon writes one), released on exit; None where ``_claim`` locked."""
        if not self._storage.shared:
            yield None
            return
        leases = RmLeases(self._storage, self._pools, ttl_s=self._lease_ttl_s,
                          clocks=self._lease_clocks)
        try:
            for run, rank in chains:
                leases.check_free(run, rank)
            self._loaded = False  # listed again now: after_step must see every commit
            for run, rank in chains:
                leases.take(run, rank, after_step=self._get_index().latest(run, rank))
            yield leases
        finally:
            leases.release_all()

    async def _renewing(self, leases: RmLeases | None, work: Awaitable[T]) -> T:
        return await (work if leases is None else leases.renewing(work))

    def _entry(self, key: StepKey) -> IndexEntry:
        check_key(key.run, key.rank, key.step)
        self._get_index()
        return self._repository.entry(key)

    def _not_found(self, key: StepKey) -> LookupError:
        self._get_index()
        return self._repository.not_found(key)
