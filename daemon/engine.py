"""The checkpoint engine: chains of base/delta checkpoints per (run, rank).

API CONTRACT (skeleton written by the lead; the engine helper implements it and may move
the implementation into smaller modules, but keeps these names and signatures, which the
gRPC servicer calls).

Call order, all from the daemon's event loop (one asyncio loop, one thread):

1. ``engine = Engine(storage, config)``; ``await engine.start()`` — rebuilds the index
   from storage, removes uncommitted leftovers. Codec and storage work run in the engine's
   own thread pool, never on the loop.
2. Saving: ``session = await engine.open_save(header)`` validates the header and reserves
   its bytes in the in-flight budget (waits for room, or raises ``BusyError`` when
   ``header.fail_if_busy``). The transport then fills the session's buffers with
   ``session.write(index, offset, data)`` (streamed chunks, in order) or
   ``session.fill_from(index, view)`` (shared memory), and calls
   ``status = await session.commit()``, which checks completeness and hands the save to
   the pipeline: received → encoding → writing → durable | failed. On any error before
   commit, the transport calls ``session.abort()``: budget and step are released and
   nothing durable changes. ``async with session:`` aborts on exception.
3. ``engine.status(key)`` / ``await engine.wait(key, timeout_s)`` report a save's state.
4. ``await engine.restore(run, rank, step | None)`` returns the verified reconstruction
   (None = latest durable step, served from memory when it is the chain's head).
5. ``list_runs()``, ``list_steps(run, rank)``, ``await delete_step(key)``,
   ``await delete_run(run)``.
6. Shutdown: ``await engine.drain(timeout_s)`` refuses new saves (``ShuttingDownError``)
   and waits until every accepted save is durable or failed; then ``await engine.close()``.
"""

from __future__ import annotations

from ckptd.daemon.config import EngineConfig
from ckptd.daemon.domain import (
    CheckpointHeader,
    RestoredCheckpoint,
    RunInfo,
    SaveStatus,
    StepInfo,
    StepKey,
)
from ckptd.daemon.storage import Storage


class SaveSession:
    """One save between its header and its acceptance; owns the reserved budget."""

    header: CheckpointHeader

    def write(self, index: int, offset: int, data: bytes | memoryview) -> None:
        """Copies a chunk of tensor ``index`` at ``offset`` (must equal bytes already written
        to it, and tensors are filled in table order); raises ``InvalidRequestError`` naming
        the tensor, offset and size when the chunk is out of order or past the tensor's end."""
        raise NotImplementedError

    def fill_from(self, index: int, view: memoryview) -> None:
        """Copies a whole tensor from ``view`` (shared memory); ``len(view)`` must equal its nbytes."""
        raise NotImplementedError

    async def commit(self) -> SaveStatus:
        """Raises ``IncompleteStreamError`` naming the first short tensor if any bytes are
        missing; else queues the save and returns its ACCEPTED status."""
        raise NotImplementedError

    def abort(self) -> None:
        """Releases the budget and the step; idempotent; a no-op after commit."""
        raise NotImplementedError

    async def __aenter__(self) -> SaveSession:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if exc_info[0] is not None:
            self.abort()


class Engine:
    """Owns every chain, the in-flight budget, the index of committed steps and the pool."""

    def __init__(self, storage: Storage, config: EngineConfig) -> None:
        self.storage = storage
        self.config = config

    async def start(self) -> None:
        raise NotImplementedError

    async def open_save(self, header: CheckpointHeader) -> SaveSession:
        raise NotImplementedError

    def status(self, key: StepKey) -> SaveStatus:
        raise NotImplementedError

    async def wait(self, key: StepKey, timeout_s: float) -> SaveStatus:
        raise NotImplementedError

    async def restore(self, run: str, rank: int, step: int | None) -> RestoredCheckpoint:
        raise NotImplementedError

    def list_runs(self) -> list[RunInfo]:
        raise NotImplementedError

    def list_steps(self, run: str, rank: int) -> list[StepInfo]:
        raise NotImplementedError

    async def delete_step(self, key: StepKey) -> int:
        raise NotImplementedError

    async def delete_run(self, run: str) -> int:
        raise NotImplementedError

    @property
    def inflight_bytes(self) -> int:
        """Bytes currently reserved in the budget (for metrics and tests)."""
        raise NotImplementedError

    async def drain(self, timeout_s: float) -> bool:
        """Returns True when every accepted save finished within the timeout."""
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError
