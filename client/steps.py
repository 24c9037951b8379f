"""``StepInfo``: one committed step as the client reports it."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ckptd.protos.v1 import pb


@dataclass(frozen=True)
class StepInfo:
    """One committed step, as the daemon lists it."""

    step: int
    kind: str  # "base" | "delta"
    parent_step: int | None  # the step a delta applies to; None for a base
    raw_bytes: int
    stored_bytes: int
    compression_ratio: float
    chain_depth: int  # deltas applied after the base to restore this step
    created_unix_s: float


def step_info(info: pb.StepInfo) -> StepInfo:
    """Converts the wire message (``parent_step`` is absent for a base)."""
    kind = "base" if info.kind == pb.STEP_KIND_BASE else "delta"
    ratio = info.compression_ratio or (
        info.raw_bytes / info.stored_bytes if info.stored_bytes else math.nan
    )
    return StepInfo(
        step=int(info.step),
        kind=kind,
        parent_step=int(info.parent_step) if info.HasField("parent_step") else None,
        raw_bytes=int(info.raw_bytes),
        stored_bytes=int(info.stored_bytes),
        compression_ratio=float(ratio),
        chain_depth=int(info.chain_depth),
        created_unix_s=float(info.created_unix_s),
    )
