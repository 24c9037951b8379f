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

import asyncio
import contextlib
import dataclasses
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
from ckptd.daemon.engine.chain import Chain, QueuedSave, planned_base
from ckptd.daemon.engine.lease import ChainLeases
from ckptd.daemon.engine.ledger import SaveLedger
from ckptd.daemon.engine.observer import EngineObserver
from ckptd.daemon.engine.pipeline import SavePipeline
from ckptd.daemon.engine.prefill import Prefill
from ckptd.daemon.engine.recycle import SpareOutputs
from ckptd.daemon.engine.reports import Reports
from ckptd.daemon.engine.resident import ResidentHeads
from ckptd.daemon.engine.restores import Restores
from ckptd.daemon.engine.retention import Retainer, pause_for_tests
from ckptd.daemon.engine.session import SaveSession
from ckptd.daemon.engine.streaming import StreamedSaves
from ckptd.daemon.engine.validation import check_header, check_key, check_run_name, is_lossy
from ckptd.daemon.errors import (
    InvalidRequestError,
    ShuttingDownError,
    StepExistsError,
    StepOrderError,
)
from ckptd.daemon.logs import fields, get_logger, step_fields
from ckptd.daemon.pools import Pools
from ckptd.daemon.storage.base import Storage
from ckptd.daemon.store.repository import Repository
from ckptd.protos.records import SaveState, StepInfo

__all__ = ["Engine", "EngineObserver", "SaveSession"]

log = get_logger("engine")
SHUTDOWN_REASON = "the daemon is shutting down and accepts no new saves"


class Engine:
    """Owns every chain, the in-flight budget, the index of committed steps and the pools."""

    def __init__(
        self, storage: Storage, config: EngineConfig, observer: EngineObserver | None = None
    ) -> None:
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
        self._leases = ChainLeases(self._repository, self._pools, config, self._chain)
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
        self._retainer = Retainer(self._repository, config.retention, self._retention_deleted)
        self._chains: dict[tuple[str, int], Chain] = {}
        self._sessions: set[SaveSession] = set()
        self._streamed = StreamedSaves(self._pipeline, self._pools, self._index,
                                       config.stream_saves)
        self._ledger = SaveLedger()
        self._idle = asyncio.Event()
        self._idle.set()
        self._started = False
        self._draining = False
        self._closed = False

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
        self._started = True
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
        self._check_accepting()
        check_header(header, self.config)
        self._repository.worlds.check_header(header)
        key = header.key
        chain = self._chain(key.run, key.rank)
        self._prefill.stop(chain)  # the session takes what is ready
        await self._leases.hold(chain)
        self._check_accepting()
        self._check_step_free(chain, key)
        chain.reserved.add(key.step)
        try:
            await self._budget.acquire(
                header.nbytes, wait=not header.fail_if_busy, what=f"save {key}",
                identity=identity,
            )
        except BaseException:
            self._release_step(chain, key.step)
            raise
        try:
            sizes = [spec.nbytes for spec in header.tensors]
            ready = not self._receive_buffers.lacking(sizes)
            stream = await self._streamed.open(chain, header, identity, ready=ready)
        except BaseException:
            self._budget.release(header.nbytes, identity)
            self._release_step(chain, key.step)
            raise
        try:
            on_tensor = None if stream is None else stream.on_tensor
            reused = self._receive_buffers.reused_bytes
            session = SaveSession(header, self._accept, self._abandon, identity=identity,
                                  allocate=self._receive_buffers.take, on_tensor=on_tensor)
            session.ready_bytes = self._receive_buffers.reused_bytes - reused
        except BaseException:
            self._budget.release(header.nbytes, identity)
            self._release_step(chain, key.step)
            if stream is not None:
                await stream.abandon()
            raise
        if stream is not None:
            self._streamed.add(session, stream)
        self._receive_buffers.trim()  # after the session took what fits: the rest is idle
        self._sessions.add(session)
        self._idle.clear()
        return session

    def status(self, key: StepKey) -> SaveStatus:
        """The save's state: in flight, DURABLE once committed, or FAILED (remembered for
        the last ``MAX_REMEMBERED`` failures: ``ckptd.daemon.engine.ledger``)."""
        check_key(key.run, key.rank, key.step)
        found = self._ledger.outcome(key, indexed=self._index.get(key) is not None)
        if found is None:
            raise self._not_found(key)
        return found

    async def wait(self, key: StepKey, timeout_s: float) -> SaveStatus:
        """Waits until the save is durable or failed, or ``timeout_s`` passes; returns the
        state at that moment either way."""
        save = self._ledger.inflight.get(key)
        if save is not None:
            try:
                await asyncio.wait_for(save.done.wait(), timeout_s)
            except asyncio.TimeoutError:
                return save.status
            return save.status
        return self.status(key)

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
        key = await self._restorable(run, rank, step, allow_incomplete)
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
        key = await self._restorable(run, rank, step, allow_incomplete)
        async with self._restores.streaming(key, self._head_arrays, identity=identity) as found:
            yield found

    async def _restorable(
        self, run: str, rank: int, step: int | None, allow_incomplete: bool
    ) -> StepKey:
        check_key(run, rank, step)
        await self._catalog.fresh()
        known = self._index.steps(run, rank)
        if not known or step not in (None, *known):
            await self._catalog.miss()  # read through: another daemon may have saved it
        served = await self._repository.worlds.restorable(run, rank, step, allow_incomplete)
        if served is None:
            raise self._not_found(StepKey(run, rank, step or 0))
        return StepKey(run, rank, served)

    async def refresh_catalog(self, run: str | None = None, rank: int | None = None) -> None:
        """Brings the catalog within ``catalog_refresh_s`` of storage before a listing (and
        reads storage at once for a chain it does not know); a no-op on unshared storage."""
        await self._catalog.fresh()
        if run is None:
            return
        if rank is None:
            check_run_name(run)
        else:
            check_key(run, rank)
        known = self._index.ranks(run) if rank is None else self._index.steps(run, rank)
        if not known:
            await self._catalog.miss()

    def list_runs(self) -> list[RunInfo]:
        """Every (run, rank) with steps, with the retention policy its run is under."""
        return [dataclasses.replace(info, retention=self._retainer.policy(info.run))
                for info in self._index.run_infos()]

    def retention(self, run: str) -> RetentionPolicy | None:
        """The policy applied to ``run``: its own, else the default (None: keep all)."""
        check_run_name(run)
        return self._retainer.policy(run)

    async def set_retention(self, run: str, policy: RetentionPolicy) -> None:
        """Stores ``run``'s retention policy (replacing any; also for a run with no step
        yet) and applies it to the run's chains in the background."""
        check_run_name(run)
        await self._retainer.set_policy(run, policy)
        for rank in self._index.ranks(run):
            self._schedule_retention(self._chain(run, rank))

    def list_steps(self, run: str, rank: int) -> list[StepInfo]:
        """The chain's steps; a world step lists the ranks known to lack it."""
        check_key(run, rank)
        infos = self._repository.step_infos(run, rank)
        if not infos:
            raise self._not_found(StepKey(run, rank, 0))
        return infos

    async def delete_step(self, key: StepKey) -> int:
        """Deletes one step (rebasing the step that depends on it first); returns 1."""
        check_key(key.run, key.rank, key.step)
        await self._catalog.fresh()
        if self._index.visible(key) is None and not await self._catalog.miss():
            raise self._not_found(key)
        chain = self._chain(key.run, key.rank)
        self._check_chain_idle(chain, f"step {key}")
        await self._leases.hold(chain)
        async with chain.lock:
            if self._index.visible(key) is None:
                raise self._not_found(key)
            head = chain.head
            await self._repository.delete_step(key, (head.step, head.arrays) if head else None)
            chain.invalidate(key.step)
            self._recount(chain)
        self._touch(chain)
        self._reports.head(key.run, key.rank)
        self._schedule_retention(chain)  # hidden steps the deleted one needed may go now
        return 1

    async def delete_run(self, run: str) -> int:
        """Deletes every step of every rank of ``run``; returns how many."""
        check_run_name(run)
        await self.refresh_catalog(run)
        ranks = self._index.ranks(run)
        if not ranks:
            raise self._repository.run_not_found(run)
        chains = [self._chain(run, rank) for rank in ranks]
        for chain in chains:
            self._check_chain_idle(chain, f"run {run!r}")
        for chain in chains:
            await self._leases.hold(chain)
        deleted = 0
        for chain in chains:
            async with chain.lock:
                deleted += await self._repository.delete_chain(chain.run, chain.rank)
                chain.invalidate()
            self._touch(chain)
            self._reports.head(chain.run, chain.rank)
        return deleted

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
        return len(self._sessions) + len(self._ledger.inflight)

    async def drain(self, timeout_s: float) -> bool:
        """Returns True when every accepted save finished within the timeout."""
        self._draining = True
        self._budget.close(SHUTDOWN_REASON)
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except asyncio.TimeoutError:
            return False
        return True

    async def close(self) -> None:
        """Aborts open sessions, fails unfinished saves, stops the pools (idempotent)."""
        if self._closed:
            return
        self._draining = self._closed = True
        self._budget.close(SHUTDOWN_REASON)
        await self._retainer.close()
        for session in list(self._sessions):
            session.abort()
        await self._streamed.settled()
        workers = [c.worker for c in self._chains.values() if c.worker is not None]
        for worker in workers:
            worker.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        for chain in self._chains.values():
            for save in list(chain.queued.values()):
                self._finish(chain, save, "the daemon shut down before the save was encoded")
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

    def _check_accepting(self) -> None:
        if not self._started:
            raise RuntimeError("Engine.start() must complete before saves are opened")
        if self._draining:
            raise ShuttingDownError(SHUTDOWN_REASON)

    def _check_step_free(self, chain: Chain, key: StepKey) -> None:
        if key.step in chain.reserved:
            raise StepExistsError(f"step {key} is already being saved")
        if self._index.visible(key) is not None:  # a hidden one: the order check says why
            raise StepExistsError(f"step {key} is already saved; delete it first to replace it")
        committed = self._index.latest(key.run, key.rank)
        pending = max(chain.reserved, default=None)
        latest = max((s for s in (committed, pending) if s is not None), default=None)
        if latest is not None and key.step <= latest:
            where = "in flight" if latest == pending else "saved"
            raise StepOrderError(
                f"step {key.step} of {key.run}/rank{key.rank} is not after the latest step "
                f"{where}, {latest}; steps must increase"
            )

    def _check_chain_idle(self, chain: Chain, what: str) -> None:
        if chain.reserved:
            raise InvalidRequestError(
                f"cannot delete {what}: saves of steps {sorted(chain.reserved)} of "
                f"{chain.run}/rank{chain.rank} are in flight; wait until they are durable"
            )

    async def _accept(self, session: SaveSession) -> SaveStatus:
        """``SaveSession.commit``: hands the received tensors to the chain's worker."""
        if self._closed:
            raise ShuttingDownError(SHUTDOWN_REASON)
        key = session.header.key
        chain = self._chain(key.run, key.rank)
        stream = self._streamed.accepted(session)
        if stream is None:
            save = QueuedSave(session.header, session.take_arrays(), session.identity)
        else:
            save = stream.accept(session.take_arrays())
        save.stages.add("receive", session.receive_s)
        save.ready_bytes = session.ready_bytes
        self._sessions.discard(session)
        self._ledger.accepted(save)
        chain.queued[key.step] = save
        chain.wakeup.set()
        base = planned_base(chain, save, self.config, self._index.latest(key.run, key.rank))
        self._prefill.accepted(chain, save.header.tensors, base=base)
        if chain.worker is None:
            name = f"ckptd-chain-{key.run}-{key.rank}"
            chain.worker = asyncio.create_task(self._work(chain), name=name)
        self._notify(lambda: self._observer.save_accepted(key, session.header.nbytes))
        return SaveStatus(key, SaveState.ACCEPTED)

    def _abandon(self, session: SaveSession) -> None:
        """``SaveSession.abort``: gives back the budget and the step. A save encoded while
        received deletes what it wrote in the background, holding the chain's lock until
        then, so the chain's next save or a delete waits for that."""
        self._streamed.abandon(session)
        self._sessions.discard(session)
        self._budget.release(session.nbytes, session.identity)
        key = session.header.key
        self._release_step(self._chain(key.run, key.rank), key.step)
        self._check_idle()

    async def _work(self, chain: Chain) -> None:
        try:
            while chain.queued:
                save = chain.next_ready()
                if save is None:
                    chain.wakeup.clear()
                    await chain.wakeup.wait()
                    continue
                del chain.queued[save.header.key.step]
                await self._process(chain, save)
                self._touch(chain)
        finally:
            chain.worker = None

    async def _process(self, chain: Chain, save: QueuedSave) -> None:
        held = chain.lock if save.streamed is None else save.streamed.holding()
        try:
            async with held:
                committed = await self._pipeline.run(chain, save)
                replaced = chain.head
                chain.advance(committed.head)
                self._outputs.retire(replaced, committed.head)
        except asyncio.CancelledError:
            self._finish(chain, save, "the daemon shut down before the save was durable")
            raise
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            log.error("save failed %s", step_fields(save.header.key, error=error),
                      exc_info=not isinstance(exc, OSError | ValueError))
            self._finish(chain, save, error, type(exc).__name__)
            return
        self._reports.durable(save, committed, self._ledger.latency_s(save.header.key))
        await self._repository.worlds.committed(save.header.key, save.header.world_size)
        self._finish(chain, save, "")
        if not self._draining:
            self._prefill.schedule(chain)  # a no-op while another save is reserved
        self._schedule_retention(chain)

    def _holds(self, run: str, rank: int) -> bool:
        return self._leases.holds(run, rank)

    def _schedule_retention(self, chain: Chain) -> None:
        """Retention writes the chain: on a shared storage only while this daemon holds it."""
        if not self.storage.shared or self._leases.holds(chain.run, chain.rank):
            self._retainer.schedule(chain)

    def _retention_deleted(self, run: str, rank: int, keys: list[StepKey], spent_s: float) -> None:
        self._ledger.retired(keys)
        self._notify(lambda: self._observer.retention_deleted(run, rank, len(keys), spent_s))

    def _finish(
        self, chain: Chain, save: QueuedSave, error: str, kind: str = ShuttingDownError.__name__
    ) -> None:
        """Ends a save: DURABLE when ``error`` is empty, else FAILED (``kind`` names the
        error's class; the default is for saves cut short by shutdown)."""
        key = save.header.key
        if save.done.is_set():
            return
        save.state = SaveState.FAILED if error else SaveState.DURABLE
        save.error = error
        save.arrays = []
        chain.queued.pop(key.step, None)
        self._ledger.finished(save)
        self._budget.release(save.header.nbytes, save.identity)
        self._release_step(chain, key.step)
        save.done.set()
        self._check_idle()
        if error:
            self._notify(lambda: self._observer.save_failed(key, kind, error))

    def _release_step(self, chain: Chain, step: int) -> None:
        chain.reserved.discard(step)
        chain.wakeup.set()

    def _check_idle(self) -> None:
        if not self._sessions and not self._ledger.inflight:
            self._idle.set()

    def _not_found(self, key: StepKey) -> LookupError:
        return self._repository.not_found(key)

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

    def _recount(self, chain: Chain) -> None:
        """Refreshes the head's chain counters after a deletion reshaped its chain."""
        if chain.head is not None:
            chain.recount(self._index.plan(StepKey(chain.run, chain.rank, chain.head.step)))
