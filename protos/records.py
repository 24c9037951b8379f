"""The records both sides of the wire report alike: where a save stands, one committed step.

The daemon's engine fills them, the CLI prints them and the trainer's client hands them to
users; a single definition keeps the three from drifting. ``step_info_from_message`` reads
the wire form (``ckptd.v1.StepInfo``) back; it imports the generated messages only, never
gRPC, so the engine may use this module.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

from ckptd.protos.ckptd.v1 import ckptd_pb2 as pb


class SaveState(enum.Enum):
    """Where a save stands: pending → accepted → encoding → writing → durable | failed.

    The daemon moves a save from ACCEPTED to DURABLE or FAILED; the client adds the states
    only it can see: PENDING (not yet accepted by the daemon) and SKIPPED (the client did
    not save: no staging buffer, or the daemon busy with ``when_busy="skip"``).
    """

    PENDING = "pending"
    ACCEPTED = "accepted"
    ENCODING = "encoding"
    WRITING = "writing"
    DURABLE = "durable"
    FAILED = "failed"
    SKIPPED = "skipped"

    @property
    def finished(self) -> bool:
        """True once the state can no longer change."""
        return self in (SaveState.DURABLE, SaveState.FAILED, SaveState.SKIPPED)


@dataclass(frozen=True)
class StepInfo:
    """One committed step of a (run, rank) chain.

    Attributes:
        step: The step number.
        kind: ``"base"`` (restores alone) or ``"delta"`` (applies to ``parent_step``).
        parent_step: The step a delta applies to; None for a base.
        raw_bytes: Size of the tensors as saved.
        stored_bytes: Size in storage (blobs and manifest).
        chain_depth: Deltas applied after the base to restore this step.
        created_unix_s: When the step was committed.
        metrics: The metrics the trainer saved with the step (``save(..., metrics=...)``).
        world_size: Ranks of the run's world when the step was saved (0: no world).
        missing_ranks: Ranks of that world that have not committed the step (empty: the
            step is complete; always empty without a world).
    """

    step: int
    kind: str
    parent_step: int | None
    raw_bytes: int
    stored_bytes: int
    chain_depth: int
    created_unix_s: float
    metrics: Mapping[str, float] = field(default_factory=dict)
    world_size: int = 0
    missing_ranks: tuple[int, ...] = ()

    @property
    def complete(self) -> bool:
        """Whether every rank of the step's world committed it (always, without a world)."""
        return not self.missing_ranks

    @property
    def compression_ratio(self) -> float:
        """``raw_bytes / stored_bytes`` (0.0 for a step that stores nothing)."""
        return self.raw_bytes / self.stored_bytes if self.stored_bytes else 0.0


_KINDS = {pb.STEP_KIND_BASE: "base", pb.STEP_KIND_DELTA: "delta"}


def step_info_from_message(message: pb.StepInfo) -> StepInfo:
    """Reads a ``ckptd.v1.StepInfo`` (``parent_step`` is set for a delta only)."""
    kind = _KINDS.get(message.kind, "unknown")
    return StepInfo(
        step=int(message.step),
        kind=kind,
        parent_step=int(message.parent_step) if message.HasField("parent_step") else None,
        raw_bytes=int(message.raw_bytes),
        stored_bytes=int(message.stored_bytes),
        chain_depth=int(message.chain_depth),
        created_unix_s=float(message.created_unix_s),
        metrics=dict(message.metrics),
        world_size=int(message.world_size),
        missing_ranks=tuple(int(rank) for rank in message.missing_ranks),
    )
