"""``Catalog`` over a storage location, through the engine's own index, restore and delete.

Nothing here talks to a daemon: the index is rebuilt from the manifests (``index.scan``, the
same code a starting daemon runs), restores go through ``Restorer`` (every blob's xxh3_64
and the step's xxh3_128 are verified) and deletes through ``Deleter`` (a dependant step is
rebased first). Unlike ``Engine.start`` this never deletes garbage or temporaries: a live
daemon's save in progress looks exactly like garbage.

Writing (``delete_*``) while a daemon serves the same storage is unsafe: the daemon's index
and head reconstruction go stale, so it may restore a deleted step from memory or encode
its next delta against a step that no longer exists. Storage carries no lock that would
reveal a live daemon, so this cannot be detected; delete through the daemon (``--target``)
whenever one is running. Reading is safe at any time (manifests are the commit point).

The engine's code is asynchronous; this class runs it on a private event loop, one call at
a time, from the caller's thread.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from ckptd.daemon.cli.catalog import Catalog, ProgressCallback, StepDetail, TensorRow
from ckptd.daemon.domain import RestoredCheckpoint, RunInfo, StepKey
from ckptd.daemon.engine.chain import Chain
from ckptd.daemon.engine.validation import check_key, check_run_name
from ckptd.daemon.errors import RunNotFoundError, StepNotFoundError, StorageError
from ckptd.daemon.pools import Pools
from ckptd.daemon.storage import Storage, open_storage
from ckptd.daemon.store.deletion import Deleter
from ckptd.daemon.store.index import IndexEntry, StepIndex, scan
from ckptd.daemon.store.restore import Restorer
from ckptd.protos.records import StepInfo

T = TypeVar("T")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
# Enough threads to overlap reads with decoding; the CLI is one short-lived process.
_CODEC_WORKERS = max(1, min(4, os.cpu_count() or 1))
_IO_WORKERS = 4


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

    def __init__(self, storage: Storage) -> None:
        self._storage = storage
        self.location = f"storage {storage.url}"
        self._loop = asyncio.new_event_loop()
        self._pools = Pools(_CODEC_WORKERS, _IO_WORKERS)
        self._restorer = Restorer(storage, self._pools)
        self._index: StepIndex | None = None
        self._closed = False
        self._claimed = False

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
        return self._get_index().run_infos()

    def list_steps(self, run: str, rank: int) -> list[StepInfo]:
        check_key(run, rank)
        infos = self._get_index().step_infos(run, rank)
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
        plan = self._get_index().plan(key)
        arrays = self._run(self._restorer.restore(plan))
        if on_progress is not None:
            on_progress(manifest.raw_bytes)
        return RestoredCheckpoint(key, manifest.specs, arrays, manifest.metadata,
                                  manifest.checksum)

    def delete_step(self, key: StepKey) -> int:
        self._claim()
        self._entry(key)
        deleter = self._deleter()

        async def delete() -> None:
            chain = Chain(key.run, key.rank)
            async with chain.lock:
                await deleter.delete_step(chain, key)

        self._run(delete())
        return 1

    def delete_run(self, run: str) -> int:
        check_run_name(run)
        self._claim()
        ranks = self._get_index().ranks(run)
        if not ranks:
            raise RunNotFoundError(f"run {run!r} has no saved steps in {self._storage.url}; "
                                   f"known runs: {self._known_runs()}")
        deleter = self._deleter()
        return sum(self._run(deleter.delete_chain(Chain(run, rank))) for rank in ranks)

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
        if self._index is None:
            found = self._run(scan(self._storage, self._pools.run_io))
            index = StepIndex()
            for entry in found.entries:
                index.add(entry)
            self._index = index
        return self._index

    def _claim(self) -> None:
        """Takes the storage for writing (refused while a daemon serves it), then drops the
        index: one read before the claim may miss steps a daemon committed since, and a
        deletion must see every child of what it deletes."""
        if not self._claimed:
            self._storage.claim(f"ckptd rm (pid {os.getpid()} on {socket.gethostname()})")
            self._claimed = True
            self._index = None

    def _deleter(self) -> Deleter:
        return Deleter(self._storage, self._get_index(), self._pools, self._restorer)

    def _entry(self, key: StepKey) -> IndexEntry:
        check_key(key.run, key.rank, key.step)
        entry = self._get_index().get(key)
        if entry is None:
            raise self._not_found(key)
        return entry

    def _not_found(self, key: StepKey) -> Exception:
        index = self._get_index()
        steps = index.steps(key.run, key.rank)
        if not steps:
            ranks = index.ranks(key.run)
            where = f"ranks with steps: {ranks}" if ranks else f"known runs: {self._known_runs()}"
            return RunNotFoundError(f"run {key.run!r} rank {key.rank} has no saved steps in "
                                    f"{self._storage.url}; {where}")
        nearby = index.nearby(key.run, key.rank, key.step)
        return StepNotFoundError(
            f"step {key} does not exist; nearby steps: {nearby} (latest {steps[-1]})"
        )

    def _known_runs(self) -> str:
        runs = sorted({run for run, _ in self._get_index().chains()})
        shown = ", ".join(runs[:10]) + (f" and {len(runs) - 10} more" if len(runs) > 10 else "")
        return shown or "none"
