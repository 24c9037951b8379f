"""Per-stage timers of one save: where its seconds went, for logs, metrics and benchmarks.

A save passes through stages that overlap (tensors encode in the codec pool while earlier
blobs are written from the I/O pool), so each stage's figure is *busy* seconds: the sum,
over every call of that stage, of the time the call took, on whichever thread ran it. A
stage's busy seconds can therefore exceed the save's wall time; the ratio of the two says
how well the stages overlap. ``timed`` wraps a blocking call so that it measures itself on
the pool thread that runs it (the queueing before it starts is not counted).

Stages, in the order a save meets them:

* ``receive``: the transport filling the receive buffers, header to the last byte (wall);
* ``head``: rebuilding the chain's head from storage before a delta (after a restart);
* ``encode_exact`` / ``encode_delta``: codec calls, lossless (bases, exact policies) or
  lossy (delta, quantize and entropy coding together: the codec times no finer);
* ``blob_checksum``: the xxh3_64 of each blob, named in the manifest;
* ``write``: storage puts of the blobs (``put_batched``: locally, without their fsync);
* ``sync``: the one durability batch of the blobs (locally: their fsyncs), before the commit;
* ``checksum``: the xxh3_128 of the reconstructed tensors, named in the manifest;
* ``commit``: the manifest's put (the commit point) and the marker's removal.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

SAVE_STAGES = (
    "receive", "head", "encode_exact", "encode_delta", "blob_checksum", "write", "sync",
    "checksum", "commit",
)  # fmt: skip


class StageTimes:
    """Busy seconds per stage of one save; ``add`` and ``timed`` are safe from any thread."""

    def __init__(self) -> None:
        self._seconds = dict.fromkeys(SAVE_STAGES, 0.0)
        self._lock = threading.Lock()

    def add(self, stage: str, seconds: float) -> None:
        """Counts ``seconds`` more for ``stage`` (one of ``SAVE_STAGES``)."""
        with self._lock:
            self._seconds[stage] += seconds

    def timed(self, stage: str, call: Callable[[], T]) -> Callable[[], T]:
        """``call`` wrapped to add its own duration to ``stage`` when it runs."""

        def run() -> T:
            began = time.perf_counter()
            try:
                return call()
            finally:
                self.add(stage, time.perf_counter() - began)

        return run

    def seconds(self) -> dict[str, float]:
        """A copy of the busy seconds, every stage present (zero when never entered)."""
        with self._lock:
            return dict(self._seconds)
