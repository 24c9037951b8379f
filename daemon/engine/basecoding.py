"""Whether a lossless blob is compressed (byte planes + zstd) or written raw.

``--base-compression``: ``zstd`` always compresses, ``none`` always writes raw, ``auto``
(default) decides per tensor from what this daemon measured: the coder's throughput and
compression ratio on exact blobs, and the storage's write throughput (the puts of the
blobs as they happen, so a first base learns the storage's rate after its first large
blob, and each save's sync charged to the bytes its puts observed, so that an fsync
counts). Per byte of tensor,
compressing costs ``1/coder + 1/(ratio * storage)`` and raw costs ``1/storage``, so raw
wins when ``storage > coder * (1 - 1/ratio)``. Float weights compress to only ~1.1-1.2x,
so on a local disk raw nearly always wins; storage far slower than the coder (an object
store over a thin link), or states that compress well overall, keep zstd. The ratio is
the daemon's, over every tensor it compressed, not each tensor's own.

Until both rates are known ``auto`` compresses (so the coder gets measured: the first
tensors of the daemon's first base, after which the rest of it is decided); observations
decay, so the choice follows the storage when it slows down or speeds up.

Called from the pipeline: ``compress()`` on the event loop when an exact tensor starts;
``coded``, ``written`` and ``synced`` from whichever thread timed the call.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

BASE_COMPRESSIONS = ("auto", "zstd", "none")
_DECAY = 0.8  # weight of what was measured before each new observation
# Calls smaller than this say more about per-call overhead than about throughput.
MIN_OBSERVED_BYTES = 1 << 20


class _Rate:
    """Bytes per second over decayed sums of observations."""

    def __init__(self) -> None:
        self.nbytes = 0.0
        self.seconds = 0.0

    def observe(self, nbytes: int, seconds: float) -> None:
        self.nbytes = self.nbytes * _DECAY + nbytes
        self.seconds = self.seconds * _DECAY + seconds

    def charge(self, seconds: float) -> None:
        """More time for bytes already observed (no decay: it is the same observations')."""
        self.seconds += seconds

    @property
    def per_s(self) -> float | None:
        return self.nbytes / self.seconds if self.seconds > 0 else None


class BaseCoding:
    """The daemon-wide choice of compression for exact blobs; safe from any thread."""

    def __init__(self, mode: str) -> None:
        if mode not in BASE_COMPRESSIONS:
            raise ValueError(
                f"base_compression must be one of {', '.join(BASE_COMPRESSIONS)}, got {mode!r}"
            )
        self.mode = mode
        self._coder = _Rate()  # raw bytes in per second of coding
        self._storage = _Rate()  # stored bytes per second of put
        self._ratio = _Rate()  # raw bytes per stored byte (nbytes: raw, seconds: stored)
        self._lock = threading.Lock()

    def compress(self) -> bool:
        """Whether the next exact blob is compressed."""
        if self.mode != "auto":
            return self.mode == "zstd"
        with self._lock:
            coder, storage, ratio = self._coder.per_s, self._storage.per_s, self._ratio.per_s
        if coder is None or storage is None or ratio is None:
            return True
        if ratio <= 1.0:
            return False  # compression gains nothing: raw costs nothing either
        return storage <= coder * (1.0 - 1.0 / ratio)

    def coded(self, raw_bytes: int, stored_bytes: int, seconds: float) -> None:
        """A compressed exact blob took ``seconds`` to code ``raw_bytes`` into ``stored_bytes``."""
        if raw_bytes < MIN_OBSERVED_BYTES:
            return
        with self._lock:
            self._coder.observe(raw_bytes, seconds)
            self._ratio.observe(raw_bytes, float(max(stored_bytes, 1)))

    def written(self, nbytes: int, seconds: float) -> None:
        """A blob's put (into its batch) of ``nbytes`` took ``seconds``."""
        if nbytes < MIN_OBSERVED_BYTES:
            return
        with self._lock:
            self._storage.observe(nbytes, seconds)

    def synced(self, blob_sizes: Sequence[int], seconds: float) -> None:
        """A save's batch of blobs (``blob_sizes`` bytes each) took ``seconds`` to become
        durable: the share of it that belongs to the blobs ``written`` observed is charged
        to them.

        Not an observation of its own: one with no bytes would decay the byte history at
        every save, and syncs of saves whose blobs were all too small to observe would
        drag the rate down with the number of saves until a fast disk read as slow.
        """
        total = sum(blob_sizes)
        observed = sum(n for n in blob_sizes if n >= MIN_OBSERVED_BYTES)
        if observed == 0:
            return
        with self._lock:
            self._storage.charge(seconds * observed / total)

    def rates(self) -> dict[str, float | None]:
        """What ``auto`` decides from: coder and storage MB/s, compression ratio."""
        with self._lock:
            coder, storage, ratio = self._coder.per_s, self._storage.per_s, self._ratio.per_s
        return {
            "coder_MBps": None if coder is None else coder / 1e6,
            "storage_MBps": None if storage is None else storage / 1e6,
            "ratio": ratio,
        }
