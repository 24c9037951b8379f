"""Saves in flight: admission, each chain's queue and worker, and how a save ends.

``Engine`` delegates its save entry points here (``open_save``, ``status``, ``wait``,
``drain`` and the save half of ``close``); the call order is ``Engine``'s docstring
(``ckptd.daemon.engine.core``). This room owns the facts a save carries between its header
and its outcome, so they change in one place:

* admission (``open``): the header checks, the step reserved in its ``Chain`` (a duplicate
  or an earlier step fails), its raw bytes in the in-flight ``ByteBudget`` under the
  identity's share, the receive buffers (``ReceiveBuffers``, a ``Prefill`` taken over) and,
  on an idle chain, the encode started while it is received (``StreamedSaves``);
* acceptance (``SaveSession.commit`` → ``_accept``): the save joins its chain's queue and
  the chain's one worker task (``_work``) runs the ``SavePipeline`` in step order;
* the end (``_finish``): DURABLE or FAILED, recorded in the ``SaveLedger`` (what ``status``
  answers from once a save left the pipeline), budget and step given back, the idle event
  ``drain`` waits on set once nothing is open or in flight.

Everything here runs on the event loop's thread; the chains, the chain lookup and the head
residency (``touch``) belong to the engine, which passes them in.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from ckptd.daemon.config import EngineConfig
from ckptd.daemon.domain import CheckpointHeader, SaveStatus, StepKey
from ckptd.daemon.engine.budget import ByteBudget
from ckptd.daemon.engine.buffers import ReceiveBuffers
from ckptd.daemon.engine.chain import Chain, QueuedSave, planned_base
from ckptd.daemon.engine.lease import ChainLeases
from ckptd.daemon.engine.ledger import SaveLedger
from ckptd.daemon.engine.pipeline import SavePipeline
from ckptd.daemon.engine.prefill import Prefill
from ckptd.daemon.engine.recycle import SpareOutputs
from ckptd.daemon.engine.reports import Reports
from ckptd.daemon.engine.session import SaveSession
from ckptd.daemon.engine.streaming import StreamedSaves
from ckptd.daemon.engine.validation import check_header, check_key
from ckptd.daemon.errors import ShuttingDownError, StepExistsError, StepOrderError
from ckptd.daemon.logs import get_logger, step_fields
from ckptd.daemon.store.repository import Repository
from ckptd.protos.records import SaveState

__all__ = ["SHUTDOWN_REASON", "Saves"]

log = get_logger("engine")
SHUTDOWN_REASON = "the daemon is shutting down and accepts no new saves"


class Saves:
    """Every save between ``open`` and its end, and each chain's worker task."""

    def __init__(
        self,
        config: EngineConfig,
        *,
        repository: Repository,
        budget: ByteBudget,
        receive_buffers: ReceiveBuffers,
        prefill: Prefill,
        streamed: StreamedSaves,
        pipeline: SavePipeline,
        outputs: SpareOutputs,
        leases: ChainLeases,
        reports: Reports,
        chains: dict[tuple[str, int], Chain],
        chain: Callable[[str, int], Chain],
        touch: Callable[[Chain], None],
        schedule_retention: Callable[[Chain], None],
    ) -> None:
        self.config = config
        self._repository, self._index = repository, repository.index
        self._budget, self._receive_buffers, self._prefill = budget, receive_buffers, prefill
        self._streamed, self._pipeline, self._outputs = streamed, pipeline, outputs
        self._leases, self._reports, self._observer = leases, reports, reports.observer
        self._notify = reports.notify  # every observer call: it never fails a save
        # The engine's: every chain, the lookup that makes one, its head's residency.
        self._chains, self._chain, self._touch = chains, chain, touch
        self._schedule_retention = schedule_retention
        self._sessions: set[SaveSession] = set()
        self._ledger = SaveLedger()
        self._idle = asyncio.Event()
        self._idle.set()
        self.started = False
        self.draining = False
        self.closed = False

    @property
    def inflight(self) -> int:
        """Saves being received plus saves accepted and not yet durable or failed."""
        return len(self._sessions) + len(self._ledger.inflight)

    async def open(self, header: CheckpointHeader, identity: str) -> SaveSession:
        """``Engine.open_save``: admits the save or raises, holding nothing on failure."""
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
        """``Engine.status``: in flight, DURABLE once indexed, FAILED while remembered."""
        check_key(key.run, key.rank, key.step)
        found = self._ledger.outcome(key, indexed=self._index.get(key) is not None)
        if found is None:
            raise self._repository.not_found(key)
        return found

    async def wait(self, key: StepKey, timeout_s: float) -> SaveStatus:
        """``Engine.wait``: the state once the save ended or ``timeout_s`` passed."""
        save = self._ledger.inflight.get(key)
        if save is not None:
            try:
                await asyncio.wait_for(save.done.wait(), timeout_s)
            except asyncio.TimeoutError:
                return save.status
            return save.status
        return self.status(key)

    def retention_deleted(
        self, run: str, rank: int, keys: list[StepKey], spent_s: float
    ) -> None:
        """The ``Retainer``'s report: ``status`` answers for the removed steps from here."""
        self._ledger.retired(keys)
        self._notify(lambda: self._observer.retention_deleted(run, rank, len(keys), spent_s))

    async def drain(self, timeout_s: float) -> bool:
        """``Engine.drain``: refuses new saves, then waits for the accepted ones."""
        self.draining = True
        self._budget.close(SHUTDOWN_REASON)
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except asyncio.TimeoutError:
            return False
        return True

    def refuse(self) -> None:
        """The first step of ``Engine.close``: no save is opened or accepted any more."""
        self.draining = self.closed = True
        self._budget.close(SHUTDOWN_REASON)

    async def stop(self) -> None:
        """The rest of ``Engine.close`` for saves: open sessions aborted, the workers
        cancelled, and every save still queued failed."""
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

    def _check_accepting(self) -> None:
        if not self.started:
            raise RuntimeError("Engine.start() must complete before saves are opened")
        if self.draining:
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

    async def _accept(self, session: SaveSession) -> SaveStatus:
        """``SaveSession.commit``: hands the received tensors to the chain's worker."""
        if self.closed:
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
        if not self.draining:
            self._prefill.schedule(chain)  # a no-op while another save is reserved
        self._schedule_retention(chain)

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
