"""Per-(run, rank) state: the reconstruction at the chain's head, the saves in flight, and
the chain policy that decides whether the next save is a base or a delta.

A chain's saves go through the pipeline strictly in step order, one at a time, under
``Chain.lock`` (deletes of the chain's steps take the same lock). The head reconstruction
is what a restore of the head step returns, bit for bit; the next delta is encoded
against it. Only the chain's own methods change it: ``advance`` after a step is committed
(or rebuilt from storage), ``invalidate`` when it may no longer be the latest step, and
``recount`` when a deletion reshaped the chain below it. So a failed save leaves the chain
exactly where it was. Used only from the event loop's thread.
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from ckptd.daemon.config import EngineConfig
from ckptd.daemon.domain import CheckpointHeader, SaveStatus, TensorSpec
from ckptd.daemon.engine.stages import StageTimes
from ckptd.daemon.store.manifest import BASE, DELTA, Manifest
from ckptd.protos.records import SaveState

if TYPE_CHECKING:
    from ckptd.daemon.engine.streaming import StreamedEncode


@dataclass(frozen=True)
class Reconstruction:
    """The tensors a restore of ``step`` returns, plus the counters the chain policy needs.

    Arrays are never modified while anything else refers to them (each step gets arrays of
    its own; a replaced head's memory is reused for a later step only once nothing but the
    head refers to it: ``ckptd.daemon.engine.recycle``), so a restore may serve them
    (read-only views, no copy) from a worker thread while the pipeline moves the head on.
    """

    step: int
    specs: tuple[TensorSpec, ...]
    arrays: tuple[np.ndarray, ...]
    checksum: str
    base_step: int
    depth: int  # deltas since the base
    base_stored_bytes: int
    delta_stored_bytes: int  # sum over the deltas since the base

    @property
    def nbytes(self) -> int:
        return sum(array.nbytes for array in self.arrays)

    @classmethod
    def from_plan(cls, plan: list[Manifest], arrays: tuple[np.ndarray, ...]) -> Reconstruction:
        """The reconstruction of ``plan[-1]`` (restored into ``arrays``), with the chain
        counters of ``plan`` (its base first)."""
        target = plan[-1]
        return cls(target.key.step, target.specs, arrays, target.checksum, 0, 0, 0, 0).with_plan(
            plan
        )

    def with_plan(self, plan: list[Manifest]) -> Reconstruction:
        """The same tensors with the counters of ``plan`` (its base first, this step last)."""
        return dataclasses.replace(
            self,
            base_step=plan[0].key.step,
            depth=len(plan) - 1,
            base_stored_bytes=plan[0].stored_bytes,
            delta_stored_bytes=sum(m.stored_bytes for m in plan[1:]),
        )


@dataclass
class QueuedSave:
    """An accepted save: its header, its received tensors (dropped once encoded), its state,
    and the identity whose share of the in-flight budget holds its bytes."""

    header: CheckpointHeader
    arrays: list[np.ndarray | None]
    identity: str = ""
    state: SaveState = SaveState.ACCEPTED
    error: str = ""
    done: asyncio.Event = field(default_factory=asyncio.Event)
    stages: StageTimes = field(default_factory=StageTimes)  # busy seconds per stage
    streamed: StreamedEncode | None = None  # while it is encoded as it is received
    was_streamed: bool = False  # it was (for its log line, once ``streamed`` is dropped)
    # Bytes received into buffers that were mapped already (reused or prepared), and delta
    # reconstructions written into a replaced head's arrays: the save's log line says.
    ready_bytes: int = 0
    recycled_bytes: int = 0
    # Names this save's blobs (``blob_key``'s tag): a writer that loses a commit race for
    # the step (``StepExistsError``) then deletes only its own blobs, never the winner's.
    blob_tag: str = field(default_factory=lambda: f"s{secrets.token_hex(6)}")
    commit_started: bool = False  # its manifest put began: a failure may have left it

    @property
    def status(self) -> SaveStatus:
        return SaveStatus(self.header.key, self.state, self.error)


class Chain:
    """The in-memory side of one (run, rank): head reconstruction and saves in flight."""

    def __init__(self, run: str, rank: int) -> None:
        self.run = run
        self.rank = rank
        # None until built: no step yet, just after start (rebuilt lazily from storage), or
        # after the head step was deleted. The pipeline rebuilds it before the next delta.
        self._head: Reconstruction | None = None
        # Steps opened, queued or in the pipeline: reserved against duplicates until they
        # are durable, failed or aborted.
        self.reserved: set[int] = set()
        self.queued: dict[int, QueuedSave] = {}
        self.lock = asyncio.Lock()
        self.wakeup = asyncio.Event()  # set when a reserved step is queued or released
        self.worker: asyncio.Task[None] | None = None

    @property
    def head(self) -> Reconstruction | None:
        """The reconstruction of the chain's latest committed step, when held in memory."""
        return self._head

    def advance(self, head: Reconstruction) -> None:
        """Makes ``head`` the chain's head: a step just committed, or rebuilt from storage."""
        self._head = head

    def invalidate(self, step: int | None = None) -> None:
        """Forgets the head (only if it is ``step``, when given); the pipeline rebuilds it
        from storage before the next delta."""
        if step is None or (self._head is not None and self._head.step == step):
            self._head = None

    def recount(self, plan: list[Manifest]) -> None:
        """Updates the head's chain counters to ``plan`` (its base first, the head last)
        after steps below it were deleted or rebased."""
        if self._head is not None:
            self._head = self._head.with_plan(plan)

    def next_ready(self) -> QueuedSave | None:
        """The lowest reserved step if it is queued; None while it is still being received
        (a later step that finished streaming first must wait its turn)."""
        if not self.reserved:
            return None
        return self.queued.get(min(self.reserved))

    def __repr__(self) -> str:
        head = self._head.step if self._head else None
        return f"Chain({self.run}/rank{self.rank}, head={head}, reserved={sorted(self.reserved)})"


def planned_base(chain: Chain, save: QueuedSave, config: EngineConfig, latest: int | None) -> bool:
    """Whether ``save``, just accepted, will be a base (its receive buffers become the head):
    as planned when it is streamed, else ``choose_kind`` against the head in memory (False
    when the head must first be rebuilt from storage: ``latest`` is the chain's latest
    committed step)."""
    if save.streamed is not None:
        return save.streamed.kind == BASE
    if chain.head is None and latest is not None:
        return False
    return choose_kind(chain.head, save.header.tensors, config)[0] == BASE


def choose_kind(
    recon: Reconstruction | None, specs: tuple[TensorSpec, ...], config: EngineConfig
) -> tuple[str, str]:
    """Chain policy: returns ("base" | "delta", why) for the next save of a chain."""
    if recon is None:
        return BASE, "no previous reconstruction"
    if recon.specs != specs:
        return BASE, "the tensor table changed (names, dtypes, shapes or policies)"
    if recon.depth + 1 >= config.base_interval:
        return BASE, f"base_interval {config.base_interval} reached"
    limit = config.max_delta_fraction * recon.base_stored_bytes
    if recon.delta_stored_bytes > limit:
        return BASE, (
            f"deltas since the base hold {recon.delta_stored_bytes} bytes, over "
            f"max_delta_fraction {config.max_delta_fraction} of the base's "
            f"{recon.base_stored_bytes}"
        )
    return DELTA, "delta against the previous reconstruction"
