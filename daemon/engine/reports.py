"""The engine's side of ``EngineObserver``: what it reports, and the guard around it.

Every observer call goes through ``Reports.notify``, which logs an observer's exception and
goes on: reporting never fails a save (``ckptd.daemon.engine.observer`` has the call
order). The two reports that gather their facts (a durable save's costs and log line, a
chain's head from the index) live here so the engine only says when.
"""

from __future__ import annotations

from collections.abc import Callable

from ckptd.daemon.engine.chain import QueuedSave
from ckptd.daemon.engine.observer import ChainHead, DurableSave, EngineObserver
from ckptd.daemon.engine.pipeline import Committed
from ckptd.daemon.logs import get_logger, step_fields
from ckptd.daemon.store.index import StepIndex

__all__ = ["Reports"]

log = get_logger("engine")


class Reports:
    """Calls ``observer`` on the engine's event loop; never raises."""

    def __init__(self, observer: EngineObserver, index: StepIndex) -> None:
        self.observer = observer
        self._index = index

    def notify(self, event: Callable[[], None]) -> None:
        """Runs one observer call; a failing observer is logged and never fails a save."""
        try:
            event()
        except Exception:
            log.exception("engine observer failed")

    def durable(self, save: QueuedSave, committed: Committed, latency_s: float) -> None:
        """Logs and reports a save that became durable, then its chain's new head."""
        key, manifest = save.header.key, committed.entry.manifest
        durable = DurableSave(
            key, manifest.kind, manifest.raw_bytes, committed.entry.stored_bytes,
            encode_s=committed.encode_s, latency_s=latency_s, stages=committed.stages,
        )
        log.info("save durable %s", step_fields(
            key, kind=durable.kind, raw_bytes=durable.raw_bytes,
            stored_bytes=durable.stored_bytes, chain_depth=manifest.chain_depth,
            streamed=save.was_streamed,  # encoded while received
            ready_bytes=save.ready_bytes,  # received into buffers mapped already
            recycled_bytes=save.recycled_bytes,  # reconstructed into a replaced head
            encode_s=round(durable.encode_s, 4), latency_s=round(durable.latency_s, 4),
            **{f"{stage}_s": round(s, 4) for stage, s in durable.stages.items()}))
        self.notify(lambda: self.observer.save_durable(durable))
        self.head(key.run, key.rank)

    def head(self, run: str, rank: int) -> None:
        """Reports (run, rank)'s latest durable step as the index has it (None: no step)."""
        entries = self._index.entries(run, rank)
        head = None
        if entries:
            entry = entries[-1]
            manifest = entry.manifest
            head = ChainHead(manifest.key.step, manifest.chain_depth, manifest.raw_bytes,
                             entry.stored_bytes)
        self.notify(lambda: self.observer.chain_head(run, rank, head))
