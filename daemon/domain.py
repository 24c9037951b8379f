"""Transport-free records the engine takes and returns.

The gRPC servicer converts protobuf messages into these and back; the engine never sees a
protobuf message or a gRPC context. Tensor bytes are numpy arrays of the dtype table's
holder dtype (``ckptd.protos.dtypes``): bfloat16 travels as ``uint16`` words.
"""

from __future__ import annotations

import enum
import math
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field

import numpy as np
from ckptd.protos import dtypes
from ckptd.protos.records import SaveState
from ckptd.protos.retention import RetentionPolicy


class Policy(enum.Enum):
    """How one tensor is stored (mirrors ``ckptd.v1.Policy``)."""

    AUTO = "auto"
    LOSSY = "lossy"
    EXACT = "exact"
    # Lossy in the log domain: relative error, never negative (Adam's second moment).
    LOSSY_LOG = "lossy-log"
    # Lossy against a fitted multiple of the reference: decaying tensors (Adam's first moment).
    LOSSY_SCALED = "lossy-scaled"



@dataclass(frozen=True)
class TensorSpec:
    """One entry of a checkpoint's tensor table."""

    name: str
    dtype: str  # a name of the dtype table, e.g. "float32", "bfloat16"
    shape: tuple[int, ...]
    policy: Policy = Policy.AUTO
    bits: int = 0  # 0: the daemon's default bit width

    @property
    def dtype_info(self) -> dtypes.DTypeInfo:
        return dtypes.from_name(self.dtype)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype_info.itemsize


@dataclass(frozen=True)
class StepKey:
    """Identifies one checkpoint: a step of one rank of one run."""

    run: str
    rank: int
    step: int

    def __str__(self) -> str:
        return f"{self.run}/rank{self.rank}/step{self.step}"


@dataclass(frozen=True)
class CheckpointHeader:
    """What a save announces before its bytes: where it belongs and what it holds."""

    key: StepKey
    tensors: tuple[TensorSpec, ...]
    metadata: Mapping[str, str] = field(default_factory=dict)
    fail_if_busy: bool = False
    # Scalars the trainer reports with the step (``val_loss``), stored in the manifest and
    # ranked by a retention policy's ``keep_best``.
    metrics: Mapping[str, float] = field(default_factory=dict)
    # Ranks of the run's world (0: no world; ``ckptd.daemon.store.world``), and whether the
    # step may change it (a torch.distributed.checkpoint save, resharded when loaded).
    world_size: int = 0
    reshardable: bool = False

    @property
    def nbytes(self) -> int:
        return sum(spec.nbytes for spec in self.tensors)


@dataclass(frozen=True)
class SaveStatus:
    """Where a save stands; ``error`` is set only when ``state`` is FAILED."""

    key: StepKey
    state: SaveState
    error: str = ""




@dataclass(frozen=True)
class RunInfo:
    """One (run, rank) chain as listed to users."""

    run: str
    rank: int
    step_count: int
    latest_step: int
    stored_bytes: int  # every stored step, hidden ones included (max_bytes counts them)
    retention: RetentionPolicy | None = None  # None: no policy, every step is kept
    # Steps retention dropped that stay stored only because a kept step restores through
    # them (not counted in step_count), and their bytes.
    hidden_steps: int = 0
    hidden_bytes: int = 0


@dataclass(frozen=True)
class RestoredCheckpoint:
    """A reconstructed checkpoint, verified against the manifest's checksum."""

    key: StepKey
    tensors: tuple[TensorSpec, ...]
    arrays: tuple[np.ndarray, ...]  # C-contiguous, holder dtype, one per spec
    metadata: Mapping[str, str]
    checksum: str


@dataclass(frozen=True)
class StreamedCheckpoint:
    """A checkpoint whose arrays arrive one at a time while they are rebuilt.

    ``arrays`` yields one C-contiguous holder-dtype array per spec, in table order; it ends
    only after the step's checksum matched, and raises ``CorruptCheckpointError`` instead of
    ending when it did not. So a transport that writes each array out as it comes must not
    tell its client the restore is complete before the iterator has ended.
    """

    key: StepKey
    tensors: tuple[TensorSpec, ...]
    arrays: AsyncIterator[np.ndarray]
    metadata: Mapping[str, str]
    checksum: str
