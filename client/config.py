"""The checkpointer's frozen, validated settings (units in the field names)."""

from __future__ import annotations

from dataclasses import dataclass

from ckptd.protos.names import MAX_RANK, run_name_problem

from .policies import PolicyRule, check_bits

TRANSPORTS = ("auto", "grpc", "shm")
WHEN_BUSY = ("wait", "skip")
SNAPSHOTS = ("copy", "overlap")


@dataclass(frozen=True)
class CheckpointerConfig:
    """Settings of one ``Checkpointer``; see its docstring for what each field does."""

    transport: str = "auto"
    bits: int = 0  # 0: the daemon's default bit width
    policies: tuple[PolicyRule, ...] = ()
    when_busy: str = "wait"
    busy_timeout_s: float = 60.0
    connect_timeout_s: float = 10.0
    reconnect_timeout_s: float = 30.0
    # Deadline of each attempt of a unary call (readiness, listing, deleting: a delete may
    # rewrite a large step as a base), and the grace a WaitSave gets beyond its wait.
    call_timeout_s: float = 30.0
    max_staging_bytes: int | None = None
    staging_buffers: int = 2
    snapshot: str = "copy"

    def __post_init__(self) -> None:
        if self.transport not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, got {self.transport!r}")
        if self.snapshot not in SNAPSHOTS:
            raise ValueError(f"snapshot must be one of {SNAPSHOTS}, got {self.snapshot!r}")
        if self.when_busy not in WHEN_BUSY:
            raise ValueError(f"when_busy must be one of {WHEN_BUSY}, got {self.when_busy!r}")
        check_bits(self.bits or None, "bits")
        for name in (
            "busy_timeout_s",
            "connect_timeout_s",
            "reconnect_timeout_s",
            "call_timeout_s",
        ):
            value = getattr(self, name)
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0 seconds, got {value!r}")
        if self.max_staging_bytes is not None and self.max_staging_bytes <= 0:
            raise ValueError(
                f"max_staging_bytes must be positive or None, got {self.max_staging_bytes}"
            )
        if self.staging_buffers < 1:
            raise ValueError(f"staging_buffers must be >= 1, got {self.staging_buffers}")


def check_world(rank: int, world_size: int | None) -> int:
    """The wire's world size (0: no world) after checking that ``rank`` lies inside it."""
    if world_size is None:
        return 0
    if isinstance(world_size, bool) or not isinstance(world_size, int) or not (
            1 <= world_size <= MAX_RANK + 1):
        raise ValueError(f"world_size must be an int in 1..{MAX_RANK + 1} or None, got "
                         f"{world_size!r}")
    if rank >= world_size:
        raise ValueError(f"rank {rank} is outside a world of {world_size} ranks (0.."
                         f"{world_size - 1}); pass the rank and world size torch.distributed "
                         "reports (get_rank(), get_world_size())")
    return world_size


def check_run(run: str, rank: int) -> None:
    """Rejects run names and ranks the daemon would refuse, before any connection."""
    if (problem := run_name_problem(run)) is not None:
        raise ValueError(problem)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank <= MAX_RANK:
        raise ValueError(f"rank must be an int in 0..{MAX_RANK}, got {rank!r}")

