"""A save encoded while it is received: each tensor goes to the codec as soon as its bytes
are complete, instead of once the whole checkpoint has arrived.

Why: a save's receive (0.3-1.6 s per GiB over shared memory, ~3 s over gRPC) and its
encode (~3 busy s per GiB of delta) ran one after the other: the pipeline started at
ACCEPTED. The session fills tensors in table order, so tensor ``i`` is final while later
ones still arrive, and its encode and blob put can run then.

When: ``open_streamed`` decides at ``Engine.open_save``, only for a chain that is idle: no
other save reserved or queued, its lock free (no save in the pipeline, no retention turn),
and its head already the reconstruction of its latest committed step (nothing to rebuild
from storage). It takes
``Chain.lock`` there and holds it until the save is durable, failed or abandoned, so a
chain's saves still go through the pipeline one at a time in step order: a save opened
meanwhile takes the usual path and waits for the lock in the chain's worker.

Call order, all on the event loop's thread:

1. ``open_streamed(...)`` returns a ``StreamedEncode`` (or None: the usual path); it
   plans the save (base or delta against the head) and puts the step's pending marker in
   the background (every blob put waits for it).
2. ``tensor_ready(index, array)``, once per tensor in table order, as the session completes
   it (``SaveSession``'s ``on_tensor``, through ``call_soon_threadsafe``: the shared-memory
   copy runs in a worker thread): a task encodes it and puts its blob, holding one of
   ``Pools.blob_slots`` like any save's tensor.
3. Then either ``accept(arrays)`` at the session's commit, after it checked that every
   byte arrived: any tensor not handed yet starts, and the ``QueuedSave`` goes to the
   chain's queue like any other; the chain's worker calls ``finish()`` (through
   ``SavePipeline.run``) inside ``holding()``: it waits for every tensor, syncs the blobs
   and commits the manifest, so nothing is committed before the whole checkpoint arrived
   (ACCEPTED means what it did); ``holding()`` releases the lock.
4. Or ``abandon()`` when the session is aborted (a stream cut or idle, a short segment, a
   shutdown): no new tensor starts, those running finish (a blob put cannot be called back
   once its thread runs), the step's keys and pending marker are deleted, then the lock is
   released. The head was never touched, so the chain's next save works as if this one
   never happened.

Crash safety is the pipeline's: the pending marker is put before the first blob, so a
crash at any point leaves a step directory that start-up proves uncommitted and removes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import numpy as np
from ckptd.daemon.domain import CheckpointHeader
from ckptd.daemon.engine.chain import Chain, QueuedSave
from ckptd.daemon.engine.pipeline import Committed, SavePipeline
from ckptd.daemon.pools import Pools
from ckptd.daemon.store.index import StepIndex
from ckptd.daemon.store.manifest import TensorEntry
from ckptd.protos.records import SaveState

Encoded = tuple[TensorEntry, np.ndarray]


class _Abandoned(Exception):
    """The save was abandoned: tensors not started yet are skipped."""


def streamable(chain: Chain, step: int, index: StepIndex) -> bool:
    """Whether a save of ``step`` opening now on ``chain`` may be encoded while received:
    the chain is idle and its head is ready (``SavePipeline.ensure_head`` would do nothing)."""
    return not chain.lock.locked() and _idle(chain, step, index)


def _idle(chain: Chain, step: int, index: StepIndex) -> bool:
    # A worker still running with nothing queued is about to end or waits for a save
    # reserved after it; either way it takes the lock only for a queued save.
    if chain.reserved != {step} or chain.queued:
        return False
    latest = index.latest(chain.run, chain.rank)
    head = chain.head
    return latest is None if head is None else head.step == latest


async def open_streamed(
    chain: Chain, header: CheckpointHeader, *, identity: str, pipeline: SavePipeline,
    pools: Pools, index: StepIndex,
) -> StreamedEncode | None:
    """A ``StreamedEncode`` holding ``chain.lock`` when the chain is ``streamable``, else
    None (the save takes the usual path)."""
    step = header.key.step
    if not streamable(chain, step, index):
        return None
    await chain.lock.acquire()  # free: immediate unless a waiter queued just now
    if not _idle(chain, step, index):
        chain.lock.release()
        return None
    return StreamedEncode(chain, QueuedSave(header, [None] * len(header.tensors), identity),
                          pipeline, pools)


class StreamedSaves:
    """The engine's saves being encoded while received, by their session, and the abandoned
    ones still deleting what they wrote (on the event loop's thread)."""

    def __init__(
        self, pipeline: SavePipeline, pools: Pools, index: StepIndex, mode: str = "always"
    ) -> None:
        """``mode``: ``EngineConfig.stream_saves``."""
        self._mode = mode
        self._pipeline = pipeline
        self._pools = pools
        self._index = index
        self._open: dict[object, StreamedEncode] = {}
        self._abandoning: set[asyncio.Task[None]] = set()

    async def open(
        self, chain: Chain, header: CheckpointHeader, identity: str, *, ready: bool
    ) -> StreamedEncode | None:
        """``open_streamed`` with the engine's pipeline (None when the mode says no; ``ready``:
        every receive buffer of the save is mapped already); ``add`` it once its session
        exists."""
        if self._mode == "never" or (self._mode == "ready" and not ready):
            return None
        return await open_streamed(chain, header, identity=identity, pipeline=self._pipeline,
                                   pools=self._pools, index=self._index)

    def add(self, session: object, stream: StreamedEncode) -> None:
        self._open[session] = stream

    def get(self, session: object) -> StreamedEncode | None:
        return self._open.get(session)

    def accepted(self, session: object) -> StreamedEncode | None:
        """The session's stream (None: not streamed), forgotten: it is queued now."""
        return self._open.pop(session, None)

    def abandon(self, session: object) -> None:
        """The session was aborted: its stream (if any) deletes what it wrote in the
        background, holding the chain's lock until then."""
        stream = self._open.pop(session, None)
        if stream is None:
            return
        task = asyncio.create_task(stream.abandon(),
                                   name=f"ckptd-abandon-{stream.save.header.key}")
        self._abandoning.add(task)
        task.add_done_callback(self._abandoning.discard)

    async def settled(self) -> None:
        """Returns once every abandoned stream deleted what it wrote (close, tests)."""
        await asyncio.gather(*self._abandoning, return_exceptions=True)


class StreamedEncode:
    """One save's tensors, encoded and written while the rest of it is received."""

    def __init__(
        self, chain: Chain, save: QueuedSave, pipeline: SavePipeline, pools: Pools
    ) -> None:
        self.save = save
        save.streamed = self
        save.was_streamed = True
        self._chain = chain
        self._pipeline = pipeline
        self._pools = pools
        self._plan = pipeline.plan(chain, save)
        save.state = SaveState.ACCEPTED  # not accepted yet: no one asks before it is
        self._marked = asyncio.ensure_future(pipeline.mark_pending(save.header.key))
        self._tasks: dict[int, asyncio.Task[Encoded]] = {}
        self._failure: list[BaseException] = []
        self._abandoned = False
        self._locked = True
        self._loop = asyncio.get_running_loop()

    @property
    def kind(self) -> str:
        """Base or delta: planned when the save opened."""
        return self._plan.kind

    def tensor_ready(self, index: int, array: np.ndarray) -> None:
        """Starts encoding tensor ``index`` (its bytes are final); a second call for the
        same tensor, or any call after ``abandon``, does nothing."""
        if self._abandoned or index in self._tasks:
            return
        self.save.arrays[index] = array
        self._tasks[index] = asyncio.create_task(
            self._tensor(index), name=f"ckptd-stream-{self.save.header.key}-{index}")

    def on_tensor(self, index: int, array: np.ndarray) -> None:
        """``tensor_ready`` from any thread (``SaveSession``'s ``on_tensor``): scheduled on
        the loop, in call order."""
        self._loop.call_soon_threadsafe(self.tensor_ready, index, array)

    def accept(self, arrays: list[np.ndarray | None]) -> QueuedSave:
        """The session committed with every byte: starts whatever tensor of ``arrays`` was
        not handed yet; returns the save to queue."""
        for index, array in enumerate(arrays):
            if array is not None:
                self.tensor_ready(index, array)
        encoding = self._plan.progress.remaining > 0
        self.save.state = SaveState.ENCODING if encoding else SaveState.WRITING
        return self.save

    async def finish(self) -> Committed:
        """Waits for every tensor, then commits (``SavePipeline.commit``); on a failure the
        step's keys are deleted and it is raised."""
        count = len(self.save.header.tensors)
        try:
            results = await asyncio.gather(
                *(self._tasks[i] for i in range(count)), return_exceptions=True)
            if self._failure:
                raise self._failure[0]
            encoded = [result for result in results if not isinstance(result, BaseException)]
            written = await self._pipeline.commit(self._chain, self.save, self._plan, encoded)
        except asyncio.CancelledError:
            self._forget()
            raise  # shutting down: storage may hang, so leave the keys to the next start
        except BaseException as exc:
            await self._pipeline.discard(self.save, exc)
            self._forget()
            raise
        try:
            return await self._pipeline.settle(self.save, self._plan, written)
        finally:
            self._forget()

    async def abandon(self) -> None:
        """The session was aborted: lets running tensors finish, deletes what was written,
        releases the chain's lock."""
        self._abandoned = True
        self._failure.append(_Abandoned())
        try:
            await asyncio.gather(*self._tasks.values(), self._marked, return_exceptions=True)
            await self._pipeline.discard(self.save, _Abandoned())
        finally:
            self.save.arrays = []
            self._forget()
            self._release()

    @contextlib.asynccontextmanager
    async def holding(self) -> AsyncIterator[None]:
        """The chain's lock, already held since the save opened: released on exit."""
        try:
            yield
        finally:
            self._release()

    async def _tensor(self, index: int) -> Encoded:
        async with self._pools.blob_slots:
            if self._failure:
                raise _Abandoned
            try:
                await asyncio.shield(self._marked)
                return await self._pipeline.tensor(self.save, index, self._plan)
            except BaseException as exc:
                self._failure.append(exc)
                raise

    def _forget(self) -> None:
        """Drops what the save no longer needs: the save and this object refer to each
        other, and a cycle would keep the previous head and the encoded tensors (GiBs that
        the garbage collector does not count) alive until a full collection."""
        self.save.streamed = None
        self._tasks.clear()
        self._failure.clear()

    def _release(self) -> None:
        if self._locked:
            self._locked = False
            self._chain.lock.release()
