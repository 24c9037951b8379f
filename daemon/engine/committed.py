"""What is committed: the engine's listing, deletion, retention-policy and restore-lookup
entry points.

``Engine`` delegates ``refresh_catalog``, ``list_runs``, ``list_steps``, ``retention``,
``set_retention``, ``delete_step`` and ``delete_run`` here, and asks ``restorable`` which
step a restore serves before it reserves the restore budget (``ckptd.daemon.engine.restores``).
They share one concern the save path does not have: the catalog may be stale on a shared
storage (``CatalogRefresh`` reads through on a miss), and a deletion rewrites a chain, so it
holds the chain's lease and lock and refuses while a save of the chain is in flight rather
than waiting behind it for an unbounded time. The repository (``ckptd.daemon.store``) does
the storage work; this room decides when, under which lock, and what the chain's in-memory
head must forget afterwards.

Everything here runs on the event loop's thread; the chains, the chain lookup, the head
residency (``touch``) and the retention scheduling belong to the engine, which passes them in.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from ckptd.daemon.domain import RetentionPolicy, RunInfo, StepKey
from ckptd.daemon.engine.catalog import CatalogRefresh
from ckptd.daemon.engine.chain import Chain
from ckptd.daemon.engine.lease import ChainLeases
from ckptd.daemon.engine.reports import Reports
from ckptd.daemon.engine.retention import Retainer
from ckptd.daemon.engine.validation import check_key, check_run_name
from ckptd.daemon.errors import InvalidRequestError
from ckptd.daemon.store.repository import Repository
from ckptd.protos.records import StepInfo

__all__ = ["CommittedSteps"]


class CommittedSteps:
    """Listing, deleting and retention of committed steps, and a restore's step lookup."""

    def __init__(
        self,
        *,
        repository: Repository,
        catalog: CatalogRefresh,
        retainer: Retainer,
        leases: ChainLeases,
        reports: Reports,
        chain: Callable[[str, int], Chain],
        touch: Callable[[Chain], None],
        schedule_retention: Callable[[Chain], None],
    ) -> None:
        self._repository, self._index = repository, repository.index
        self._catalog, self._retainer, self._leases = catalog, retainer, leases
        self._reports = reports
        # The engine's: the lookup that makes a chain, its head's residency, retention.
        self._chain, self._touch = chain, touch
        self._schedule_retention = schedule_retention

    async def restorable(
        self, run: str, rank: int, step: int | None, allow_incomplete: bool
    ) -> StepKey:
        """The step a restore of ``step`` serves (None: the latest durable one; for a run
        with a world, the latest complete one), reading storage through on a miss."""
        check_key(run, rank, step)
        await self._catalog.fresh()
        known = self._index.steps(run, rank)
        if not known or step not in (None, *known):
            await self._catalog.miss()  # read through: another daemon may have saved it
        served = await self._repository.worlds.restorable(run, rank, step, allow_incomplete)
        if served is None:
            raise self._repository.not_found(StepKey(run, rank, step or 0))
        return StepKey(run, rank, served)

    async def refresh_catalog(self, run: str | None = None, rank: int | None = None) -> None:
        """See ``Engine.refresh_catalog``."""
        await self._catalog.fresh()
        if run is None:
            return
        if rank is None:
            check_run_name(run)
        else:
            check_key(run, rank)
        known = self._index.ranks(run) if rank is None else self._index.steps(run, rank)
        if not known:
            await self._catalog.miss()

    def list_runs(self) -> list[RunInfo]:
        """See ``Engine.list_runs``."""
        return [dataclasses.replace(info, retention=self._retainer.policy(info.run))
                for info in self._index.run_infos()]

    def retention(self, run: str) -> RetentionPolicy | None:
        """See ``Engine.retention``."""
        check_run_name(run)
        return self._retainer.policy(run)

    async def set_retention(self, run: str, policy: RetentionPolicy) -> None:
        """See ``Engine.set_retention``."""
        check_run_name(run)
        await self._retainer.set_policy(run, policy)
        for rank in self._index.ranks(run):
            self._schedule_retention(self._chain(run, rank))

    def list_steps(self, run: str, rank: int) -> list[StepInfo]:
        """See ``Engine.list_steps``."""
        check_key(run, rank)
        infos = self._repository.step_infos(run, rank)
        if not infos:
            raise self._repository.not_found(StepKey(run, rank, 0))
        return infos

    async def delete_step(self, key: StepKey) -> int:
        """See ``Engine.delete_step``."""
        check_key(key.run, key.rank, key.step)
        await self._catalog.fresh()
        if self._index.visible(key) is None and not await self._catalog.miss():
            raise self._repository.not_found(key)
        chain = self._chain(key.run, key.rank)
        self._check_chain_idle(chain, f"step {key}")
        await self._leases.hold(chain)
        async with chain.lock:
            if self._index.visible(key) is None:
                raise self._repository.not_found(key)
            head = chain.head
            before_put = await self._leases.rewrite_check(chain)
            await self._repository.delete_step(key, (head.step, head.arrays) if head else None,
                                               before_put=before_put)
            chain.invalidate(key.step)
            self._recount(chain)
        self._touch(chain)
        self._reports.head(key.run, key.rank)
        self._schedule_retention(chain)  # hidden steps the deleted one needed may go now
        return 1

    async def delete_run(self, run: str) -> int:
        """See ``Engine.delete_run``."""
        check_run_name(run)
        await self.refresh_catalog(run)
        ranks = self._index.ranks(run)
        if not ranks:
            raise self._repository.run_not_found(run)
        chains = [self._chain(run, rank) for rank in ranks]
        for chain in chains:
            self._check_chain_idle(chain, f"run {run!r}")
        for chain in chains:
            await self._leases.hold(chain)
        deleted = 0
        for chain in chains:
            async with chain.lock:
                deleted += await self._repository.delete_chain(chain.run, chain.rank)
                chain.invalidate()
            self._touch(chain)
            self._reports.head(chain.run, chain.rank)
        return deleted

    def _check_chain_idle(self, chain: Chain, what: str) -> None:
        if chain.reserved:
            raise InvalidRequestError(
                f"cannot delete {what}: saves of steps {sorted(chain.reserved)} of "
                f"{chain.run}/rank{chain.rank} are in flight; wait until they are durable"
            )

    def _recount(self, chain: Chain) -> None:
        """Refreshes the head's chain counters after a deletion reshaped its chain."""
        if chain.head is not None:
            chain.recount(self._index.plan(StepKey(chain.run, chain.rank, chain.head.step)))
