"""Keeping the catalog fresh when other daemons write the same storage.

The engine's ``StepIndex`` is a cache of storage. On a storage other daemons may write at
the same time (``Storage.shared``: an object store, one daemon per host), ``CatalogRefresh``
bounds how stale the answers of listings, restores and deletes are: ``fresh()`` (before
every catalog read) re-reads storage when the last refresh is older than
``catalog_refresh_s``, and ``miss()`` (when a run or step is not in the index) re-reads it
at once, so a step another daemon committed is seen by the next read at most
``catalog_refresh_s`` after its commit, and a restore of a step never seen before reads
through. Refreshes are incremental (only manifests the index does not know are read) and
shared: concurrent reads wait for one refresh. On a storage this daemon writes alone
(a claimed local directory) both are no-ops. Used on the engine's event loop.
"""

from __future__ import annotations

import asyncio
import time

from ckptd.daemon.store.repository import Repository


class CatalogRefresh:
    """Bounded-staleness refreshes of one repository's index."""

    def __init__(self, repository: Repository, refresh_s: float, *, enabled: bool) -> None:
        self._repository = repository
        self._refresh_s = refresh_s
        self.enabled = enabled
        self._refreshed_at_s = time.monotonic()  # the start-up scan is a refresh
        self._running: asyncio.Task[None] | None = None

    async def fresh(self) -> None:
        """Refreshes if the index may be older than ``catalog_refresh_s``."""
        if self.enabled and time.monotonic() - self._refreshed_at_s >= self._refresh_s:
            await self._refresh()

    async def miss(self) -> bool:
        """Refreshes now (a lookup found nothing); False when there is nothing to refresh."""
        if not self.enabled:
            return False
        await self._refresh()
        return True

    async def _refresh(self) -> None:
        if self._running is None:
            started_s = time.monotonic()
            self._running = asyncio.create_task(self._repository.refresh())
            try:
                await asyncio.shield(self._running)
            finally:
                self._running = None
            self._refreshed_at_s = started_s
        else:
            await asyncio.shield(self._running)
