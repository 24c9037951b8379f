"""What the engine reports about its saves and chains, for whoever watches (metrics).

The engine stays transport- and exporter-free: it calls an ``EngineObserver`` at a few
points of a save's life and never learns who listens. ``ckptd.daemon.server.metrics.Metrics``
is the Prometheus implementation the server passes in; the base class here does nothing,
so an engine built without an observer (tests, embedding) pays nothing.

Call order, all on the engine's event loop thread (an observer must not block or await):

* ``save_accepted`` once a save's bytes are all in and the pipeline took it (commit);
* then exactly one of ``save_durable`` (its manifest is committed) or ``save_failed``
  (encode or storage failed, or the daemon shut down first);
* ``resident_heads`` whenever the bytes of chain-head reconstructions held in memory may
  have changed, after ``head_evicted`` for each head dropped to keep within
  ``max_resident_bytes``;
* ``step_quarantined`` at start, for each step directory moved to the quarantine area
  (``ckptd.daemon.store.quarantine``), then ``quarantine_size`` once with how many the area
  holds;
* ``chain_head`` whenever the latest durable step of a (run, rank) may have changed: for
  every chain found at start, after each durable save, and after deletes (``None`` once
  the chain has no step left).

An observer that raises is logged and otherwise ignored: reporting never fails a save.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ckptd.daemon.domain import StepKey


@dataclass(frozen=True)
class DurableSave:
    """A save that became durable, with what it cost."""

    key: StepKey
    kind: str  # "base" or "delta"
    raw_bytes: int
    # Bytes the step occupies in storage: its blobs plus its manifest.
    stored_bytes: int
    # Wall time from the first tensor's encoding to the last one's (puts overlap it).
    encode_s: float
    # Wall time from acceptance (commit of the stream) to durable, queueing included.
    latency_s: float
    # Busy seconds per stage (``ckptd.daemon.engine.stages.SAVE_STAGES``): stages overlap,
    # so they may add up to more than ``latency_s``.
    stages: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ChainHead:
    """The latest durable step of one (run, rank)."""

    step: int
    chain_depth: int  # deltas between this step and its base; 0 for a base
    raw_bytes: int
    stored_bytes: int

    @property
    def compression_ratio(self) -> float:
        """Raw over stored bytes of the head step (0 when nothing is stored)."""
        return self.raw_bytes / self.stored_bytes if self.stored_bytes > 0 else 0.0


class EngineObserver:
    """Receives the engine's events; every method here is a no-op to override."""

    def save_accepted(self, key: StepKey, raw_bytes: int) -> None:
        """A save's bytes are all in and it is queued for encoding."""

    def save_durable(self, save: DurableSave) -> None:
        """A save's manifest is committed: it survives a restart."""

    def save_failed(self, key: StepKey, kind: str, message: str) -> None:
        """An accepted save will never be durable; ``kind`` is the error's class name."""

    def chain_head(self, run: str, rank: int, head: ChainHead | None) -> None:
        """The latest durable step of ``run``/``rank`` is ``head`` (None: no step left)."""

    def step_quarantined(self, key: StepKey, reason: str) -> None:
        """Start-up moved ``key``'s directory to quarantine: it may have been committed,
        but its manifest is missing or unreadable (``reason``)."""

    def quarantine_size(self, steps: int) -> None:
        """The quarantine area holds ``steps`` step directories (reported at start)."""

    def resident_heads(self, nbytes: int) -> None:
        """Chain-head reconstructions held in memory now take ``nbytes``."""

    def retention_deleted(self, run: str, rank: int, steps: int, seconds: float) -> None:
        """Retention removed ``steps`` steps of ``run``/``rank`` in one action (deleted, or
        hidden; 0 for a rewrite or for deleting steps hidden before), taking ``seconds``
        under the chain's lock."""

    def head_evicted(self, nbytes: int) -> None:
        """A chain's head of ``nbytes`` was dropped from memory (least recently used)."""
