"""Typed, frozen configuration of the daemon; units are in the field names.

``EngineConfig`` is what the transport-free engine needs; ``DaemonConfig`` adds the server's
settings. The CLI flags and ``CKPTD_*`` environment variables are thin layers that fill
these fields (``ckptd.daemon.cli``); nothing reads the environment at import time.
"""

from __future__ import annotations

from dataclasses import dataclass

GiB = 1 << 30
MiB = 1 << 20


@dataclass(frozen=True)
class EngineConfig:
    """Settings of the checkpoint engine (chains, codec, budget, limits)."""

    # Bytes of received-but-not-yet-durable checkpoint data the daemon holds at once.
    # Resident memory is bounded by this plus one reconstruction per active (run, rank).
    max_inflight_bytes: int = 2 * GiB
    # A new lossless base every this many saves of a (run, rank).
    base_interval: int = 20
    # Also a new base once the deltas since the base outweigh this fraction of it.
    max_delta_fraction: float = 1.0
    default_bits: int = 3
    representative: str = "mean"
    coder: str = "zstd"
    # Float tensors with fewer elements than this are stored exactly under POLICY_AUTO.
    min_lossy_elements: int = 1024
    max_checkpoint_bytes: int = 256 * GiB
    max_tensors: int = 100_000
    max_name_chars: int = 1024
    max_metadata_bytes: int = 16 * MiB
    # Threads that run the codec; numpy and zstd release the GIL.
    encode_workers: int = 2

    def __post_init__(self) -> None:
        if self.max_inflight_bytes <= 0:
            raise ValueError(f"max_inflight_bytes must be positive, got {self.max_inflight_bytes}")
        if self.base_interval < 1:
            raise ValueError(f"base_interval must be >= 1, got {self.base_interval}")
        if not 1 <= self.default_bits <= 8:
            raise ValueError(f"default_bits must be in 1..8, got {self.default_bits}")
        if self.representative not in ("mean", "midrange"):
            raise ValueError(f"representative must be 'mean' or 'midrange', got {self.representative!r}")
        if self.coder not in ("zstd", "huffman"):
            raise ValueError(f"coder must be 'zstd' or 'huffman', got {self.coder!r}")
        if self.encode_workers < 1:
            raise ValueError(f"encode_workers must be >= 1, got {self.encode_workers}")
