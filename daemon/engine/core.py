"""The checkpoint engine: chains of base/delta checkpoints per (run, rank).

Call order, all from the daemon's event loop (one asyncio loop, one thread):

1. ``engine = Engine(storage, config)``; ``await engine.start()`` — rebuilds the index
   from storage, removes provably uncommitted leftovers, quarantines step directories
   that may have been committed but cannot be read. Codec and storage work run in the engine's
   own thread pools, never on the loop.
2. Saving: ``session = await engine.open_save(header, identity=...)`` validates the
   header, reserves the step (a concurrent duplicate fails) and reserves its bytes in the
   in-flight budget under the identity's share (waits for room, or raises ``BusyError``
   when ``header.fail_if_busy``; ``ckptd.daemon.engine.budget`` has the fairness rule). The
   transport
   then fills the session's buffers with ``session.write(index, offset, data)`` (streamed
   chunks, in order) or ``session.fill_with(index, fill)`` (shared memory), and calls
   ``status = await session.commit()``, which checks completeness and hands the save to
   the pipeline: accepted → encoding → writing → durable | failed. On an idle chain the
   tensors are encoded and written as they arrive, and only the commit waits for the
   whole checkpoint (``ckptd.daemon.engine.streaming``). On any error before
   commit, the transport calls ``session.abort()``: budget and step are released and
   nothing durable changes. ``async with session:`` aborts on exception.
3. ``engine.status(key)`` / ``await engine.wait(key, timeout_s)`` report a save's state.
4. ``async with engine.restoring(run, rank, step | None, identity=...) as restored:``
   reserves the step's raw size in the restore budget (waiting for room), materializes
   the verified reconstruction (None = latest durable step; read-only views of the arrays
   in memory, not a copy, when it is the chain's head) and holds the reservation until the
   transport has sent it and leaves the block. ``await engine.restore(...)`` is the same,
   released on return. ``engine.restoring_streamed(...)`` is the same block yielding the
   arrays one at a time while they are rebuilt (``StreamedCheckpoint``), for a transport
   that writes each out at once (a restore into shared memory).
5. ``list_runs()``, ``list_steps(run, rank)``, ``await delete_step(key)``,
   ``await delete_run(run)``, ``await set_retention(run, policy)``. Deleting refuses
   (``InvalidRequestError``) while a save of the same (run, rank) is in flight, rather than
   waiting behind it for an unbounded time.
6. Observing: an ``EngineObserver`` passed at construction hears of every accepted,
   durable and failed save and of each chain's head (``ckptd.daemon.engine.observer``); the
   server passes the Prometheus ``Metrics``, the engine never knows.
7. Shutdown: ``await engine.drain(timeout_s)`` refuses new saves (``ShuttingDownError``;
   saves waiting for budget get it too), lets sessions already open commit, and waits
   until every accepted save is durable or failed; then ``await engine.close()`` fails
   whatever is left and stops the pools. The storage belongs to the caller, who closes it.

Many daemons on one storage: a chain is written only under this daemon's lease of it
(``ckptd.daemon.engine.lease``: taken by ``open_save`` and the deletes, checked before each
commit, renewed in the background, released by ``close``), and on a shared storage the
catalog reads refresh from storage with bounded staleness (``ckptd.daemon.engine.catalog``;
the server calls ``refresh_catalog`` before listings). On a shared storage start-up leaves
leftovers alone: each chain's next lease taker removes its own.

Retention: after each durable save (and for every chain at start, and after
``set_retention``) the chain is handed to the ``Retainer`` (``ckptd.daemon.engine.retention``),
whose own task deletes what the run's policy no longer keeps, one bounded group per turn
of the chain's lock; the save never waits for it.

Pipeline order: one worker task per chain takes its saves strictly in step order (a step
still streaming holds back a later one that finished first); chains run in parallel.

Memory: the budget counts a save's raw bytes from ``open_save`` until it is durable or
failed. Its receive buffers are dropped tensor by tensor as soon as each is encoded (an
exact tensor's buffer becomes the chain's new reconstruction instead of being copied; a
delta's is kept for the next save's receive, within the budget's free room:
``ckptd.daemon.engine.buffers``);
what the budget still covers after that is the encoded blobs on their way to storage.
Once a chain's save is durable and no other is reserved (a base: once it is accepted),
buffers its next save would lack (a base's and exact tensors' became the head) are made
and mapped in the background, within the same free room (``ckptd.daemon.engine.prefill``).
Beyond the budget, chains hold their head reconstruction in memory, least recently used
evicted beyond ``max_resident_bytes`` (``ckptd.daemon.engine.resident``); a replaced
head's memory that nothing reads any more is kept, within the same bound, as the next
deltas' reconstructions (``ckptd.daemon.engine.recycle``); and restores
being streamed hold their tensors within ``max_restore_bytes``.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator

import numpy as np
from ckptd.daemon.config import EngineConfig
from ckptd.daemon.domain import (
    CheckpointHeader,
    RestoredCheckpoint,
    RetentionPolicy,
    RunInfo,
    SaveStatus,
    StepKey,
    StreamedCheckpoint,
)
from ckptd.daemon.engine.budget import ByteBudget
from ckptd.daemon.engine.buffers import ReceiveBuffers
from ckptd.daemon.engine.catalog import CatalogRefresh
from ckptd.daemon.engine.chain import Chain
from ckptd.daemon.engine.committed import CommittedSteps
from ckptd.daemon.engine.lease import ChainLeases, LeaseClocks
from ckptd.daemon.engine.observer import EngineObserver
from ckptd.daemon.engine.pipeline import SavePipeline
from ckptd.daemon.engine.prefill import Prefill
from ckptd.daemon.engine.recycle import SpareOutputs
from ckptd.daemon.engine.reports import Reports
from ckptd.daemon.engine.resident import ResidentHeads
from ckptd.daemon.engine.restores import Restores
from ckptd.daemon.engine.retention import Retainer, pause_for_tests
from ckptd.daemon.engine.saves import Saves
from ckptd.daemon.engine.session import SaveSession
from ckptd.daemon.engine.streaming import StreamedSaves
from ckptd.daemon.engine.validation import is_lossy
from ckptd.daemon.logs import fields, get_logger, step_fields
from ckptd.daemon.pools import Pools
from ckptd.daemon.storage.base import Storage
from ckptd.daemon.store.repository import Repository
from ckptd.protos.records import StepInfo

__all__ = ["Engine", "EngineObserver", "SaveSession"]

log = get_logger("engine")


class Engine:
    """Owns every chain, the in-flight budget, the index of committed steps and the pools.

    A facade: the saves in flight are ``Saves`` (``ckptd.daemon.engine.saves``), the
    listings, deletions and retention policies ``CommittedSteps``
    (``ckptd.daemon.engine.committed``), the restore budget ``Restores``; the engine builds
    them over one set of shared parts and keeps the chains and their heads' residency.
    """

    def __init__(
        self, storage: Storage, config: EngineConfig, observer: EngineObserver | None = None,
        *, lease_clocks: LeaseClocks | None = None,
    ) -> None:
        """``lease_clocks``: what the chain leases read the time from (tests advance a
        fake pair; ``ckptd.daemon.engine.lease.LeaseClocks``)."""
        self.storage = storage
        self.config = config
        self._pools = Pools(config.encode_workers, config.storage_workers)
        self._budget = ByteBudget(config.max_inflight_bytes, share=config.max_inflight_share)
        self._receive_buffers = ReceiveBuffers(self._budget)
        self._prefill = Prefill(self._receive_buffers, self._pools)
        self._resident = ResidentHeads(config.max_resident_bytes)
        self._outputs = SpareOutputs(self._resident, lambda spec: is_lossy(spec, config))
        self._repository = Repository(storage, self._pools,
                                      pause_for_tests(config.test_pause_at), held=self._holds)
        self._leases = ChainLeases(self._repository, self._pools, config, self._chain,
                                   clocks=lease_clocks)
        self._catalog = CatalogRefresh(self._repository, config.catalog_refresh_s,
                                       enabled=storage.shared)
        self._restores = Restores(
            self._repository, config.max_restore_bytes, config.max_inflight_share
        )
        self._index = self._repository.index  # read-only queries; writes go through it
        self._reports = Reports(observer or EngineObserver(), self._index)
        self._observer = self._reports.observer
        self._notify = self._reports.notify  # every observer call: it never fails a save
        self._pipeline = SavePipeline(self._repository, config, self._pools,
                                      fence=self._leases.fence,
                                      recycle=self._receive_buffers.give_back,
                                      output=self._outputs.take)
        self._chains: dict[tuple[str, int], Chain] = {}
        self._streamed = StreamedSaves(self._pipeline, self._pools, self._index,
                                       config.stream_saves)
        self._saves = Saves(
            config, repository=self._repository, budget=self._budget,
            receive_buffers=self._receive_buffers, prefill=self._prefill,
            streamed=self._streamed, pipeline=self._pipeline, outputs=self._outputs,
            leases=self._leases, reports=self._reports, chains=self._chains,
            chain=self._chain, touch=self._touch, schedule_retention=self._schedule_retention,
        )
        self._retainer = Retainer(self._repository, config.retention,
                                  self._saves.retention_deleted, self._leases.rewrite_check,
                                  hold=self._leases.hold if storage.shared else None)
        self._committed = CommittedSteps(
            repository=self._repository, catalog=self._catalog, retainer=self._retainer,
            leases=self._leases, reports=self._reports, chain=self._chain, touch=self._touch,
            schedule_retention=self._schedule_retention,
        )

    async def start(self) -> None:
        """Indexes every committed step, deletes what is provably uncommitted and moves
        what may have been committed but cannot be read to quarantine (``scan`` in
        ``ckptd.daemon.store.index`` has the rule). A failed quarantine move fails the
        start: serving would let a new save overwrite the damaged step's blobs."""
        found = await self._repository.load()
        await self._retainer.load()
        if self.storage.shared:  # another daemon's save in progress looks the same
            found.garbage, found.damaged = [], []
        if found.garbage:
            await self._pools.run_io(lambda: self.storage.delete(found.garbage))
        moved = await self._repository.quarantine(found.damaged)
        for entry in moved:
            log.error("quarantined a step that may have been committed; see `ckptd ls "
                      "--quarantined` %s", step_fields(
                          entry.key, reason=entry.reason, moved_to=entry.prefix,
                          keys=len(entry.keys), stored_bytes=entry.stored_bytes))
            self._notify(functools.partial(self._observer.step_quarantined, entry.key,
                                           entry.reason))
        held = len(await self._repository.quarantined())
        self._notify(lambda: self._observer.quarantine_size(held))
        temporaries = await self._pools.run_io(self.storage.cleanup_temporaries)
        repaired = await self._repository.worlds.repair()
        self._saves.started = True
        self._leases.start()
        for run, rank in self._index.chains():
            self._reports.head(run, rank)
            self._schedule_retention(self._chain(run, rank))
        log.info("engine started %s", fields(
            steps=len(found.entries), chains=len(self._index.chains()),
            removed_keys=len(found.garbage), quarantined=len(moved), in_quarantine=held,
            removed_temporaries=temporaries, repaired_worlds=repaired))

    async def open_save(self, header: CheckpointHeader, *, identity: str = "") -> SaveSession:
        """Opens a save; ``identity`` names the trainer whose share of the in-flight budget
        its bytes count against ("" when the transport knows none)."""
        return await self._saves.open(header, identity)

    def status(self, key: StepKey) -> SaveStatus:
        """The save's state: in flight, DURABLE once committed, or FAILED (remembered for
        the last ``MAX_REMEMBERED`` failures: ``ckptd.daemon.engine.ledger``)."""
        return self._saves.status(key)

    async def wait(self, key: StepKey, timeout_s: float) -> SaveStatus:
        """Waits until the save is durable or failed, or ``timeout_s`` passes; returns the
        state at that moment either way."""
        return await self._saves.wait(key, timeout_s)

    async def restore(
        self, run: str, rank: int, step: int | None, *, allow_incomplete: bool = False
    ) -> RestoredCheckpoint:
        """The verified reconstruction of ``step`` (None: the latest durable step)."""
        async with self.restoring(run, rank, step, allow_incomplete=allow_incomplete) as found:
            return found

    @contextlib.asynccontextmanager
    async def restoring(
        self, run: str, rank: int, step: int | None, *, identity: str = "",
        allow_incomplete: bool = False,
    ) -> AsyncIterator[RestoredCheckpoint]:
        """Yields the verified reconstruction of ``step`` (None: the latest durable step;
        for a run with a world, the latest complete one) while its raw size is reserved in
        the restore budget, under ``identity``'s share (``ckptd.daemon.engine.restores``).
        A world step that some rank lacks is ``StepIncompleteError`` unless
        ``allow_incomplete`` (``ckptd.daemon.store.world``)."""
        key = await self._committed.restorable(run, rank, step, allow_incomplete)
        async with self._restores.serving(key, self._head_arrays, identity=identity) as found:
            yield found

    @contextlib.asynccontextmanager
    async def restoring_streamed(
        self, run: str, rank: int, step: int | None, *, identity: str = "",
        allow_incomplete: bool = False,
    ) -> AsyncIterator[StreamedCheckpoint]:
        """``restoring``, but the arrays come one at a time while they are rebuilt
        (``StreamedCheckpoint``: its iterator ends only once the step's checksum matched),
        for a transport that writes each out while the next are read and decoded."""
        key = await self._committed.restorable(run, rank, step, allow_incomplete)
        async with self._restores.streaming(key, self._head_arrays, identity=identity) as found:
            yield found

    async def refresh_catalog(self, run: str | None = None, rank: int | None = None) -> None:
        """Brings the catalog within ``catalog_refresh_s`` of storage before a listing (and
        reads storage at once for a chain it does not know); a no-op on unshared storage."""
        await self._committed.refresh_catalog(run, rank)

    def list_runs(self) -> list[RunInfo]:
        """Every (run, rank) with steps, with the retention policy its run is under."""
        return self._committed.list_runs()

    def retention(self, run: str) -> RetentionPolicy | None:
        """The policy applied to ``run``: its own, else the default (None: keep all)."""
        return self._committed.retention(run)

    async def set_retention(self, run: str, policy: RetentionPolicy) -> None:
        """Stores ``run``'s retention policy (replacing any; also for a run with no step
        yet) and applies it to the run's chains in the background."""
        await self._committed.set_retention(run, policy)

    def list_steps(self, run: str, rank: int) -> list[StepInfo]:
        """The chain's steps; a world step lists the ranks known to lack it."""
        return self._committed.list_steps(run, rank)

    async def delete_step(self, key: StepKey) -> int:
        """Deletes one step (rebasing the step that depends on it first); returns 1."""
        return await self._committed.delete_step(key)

    async def delete_run(self, run: str) -> int:
        """Deletes every step of every rank of ``run``; returns how many."""
        return await self._committed.delete_run(run)

    @property
    def inflight_bytes(self) -> int:
        """Bytes currently reserved in the budget (for metrics and tests)."""
        return self._budget.in_use_bytes

    @property
    def restore_bytes(self) -> int:
        """Bytes reserved by restores being materialized or streamed."""
        return self._restores.budget.in_use_bytes

    @property
    def resident_bytes(self) -> int:
        """Bytes of chain-head reconstructions held in memory."""
        return self._resident.resident_bytes

    @property
    def inflight_saves(self) -> int:
        """Saves being received plus saves accepted and not yet durable or failed."""
        return self._saves.inflight

    async def drain(self, timeout_s: float) -> bool:
        """Returns True when every accepted save finished within the timeout."""
        return await self._saves.drain(timeout_s)

    async def close(self) -> None:
        """Aborts open sessions, fails unfinished saves, stops the pools (idempotent)."""
        if self._saves.closed:
            return
        self._saves.refuse()
        await self._retainer.close()
        await self._saves.stop()
        await self._leases.close()
        await self._prefill.close()
        self._receive_buffers.clear()
        self._outputs.clear()
        await self._pools.shutdown()

    # -- internals ------------------------------------------------------------------------

    def _chain(self, run: str, rank: int) -> Chain:
        chain = self._chains.get((run, rank))
        if chain is None:
            chain = self._chains[(run, rank)] = Chain(run, rank)
        return chain

    def _holds(self, run: str, rank: int) -> bool:
        return self._leases.holds(run, rank)

    def _schedule_retention(self, chain: Chain) -> None:
        """Retention writes the chain: on a shared storage only while this daemon holds it."""
        if not self.storage.shared or self._leases.holds(chain.run, chain.rank):
            self._retainer.schedule(chain)

    def _head_arrays(self, key: StepKey) -> tuple[np.ndarray, ...] | None:
        """``key``'s arrays when it is its chain's head in memory (marked as just used)."""
        chain = self._chains.get((key.run, key.rank))
        head = chain.head if chain is not None else None
        if chain is None or head is None or head.step != key.step:
            return None
        self._touch(chain)
        return head.arrays

    def _touch(self, chain: Chain) -> None:
        """Marks ``chain``'s head as just used and evicts least recently used heads of
        idle chains beyond ``max_resident_bytes`` (rebuilt from storage when needed)."""
        for evicted in self._resident.touch(chain):
            log.info("chain head evicted from memory %s", fields(
                run=evicted.run, rank=evicted.rank, step=evicted.step, bytes=evicted.nbytes,
                resident_bytes=self._resident.resident_bytes))
            self._notify(functools.partial(self._observer.head_evicted, evicted.nbytes))
        self._outputs.trim()  # spare outputs fit beside the heads
        resident = self._resident.resident_bytes
        self._notify(lambda: self._observer.resident_heads(resident))
