"""The chain leases this daemon holds: taken at a chain's first write, renewed, released.

One writer per (run, rank) chain, enforced by the store (``ckptd.daemon.store.lease`` has
the rules). Call order, all on the engine's event loop:

* ``await hold(chain)`` before any write to a chain (``Engine.open_save``, deletes): a
  live lease of this daemon returns at once; otherwise, under ``chain.lock``, the chain is
  read afresh from storage (``Repository.scan_chain``), the next generation is taken with
  that scan's latest step as its fencing point, the index's entries of the chain are
  replaced by the scan's, what the previous holder left half-done (uncommitted and void
  step directories) is deleted, and the chain's in-memory head is dropped unless it is
  still the chain's latest step (same step and checksum: this daemon took the lease back
  after an idle release), so that the next save rebuilds it from storage and continues the
  chain with a delta. A live lease of
  another daemon raises ``ChainLeasedError`` naming it.
* ``await fence(chain)`` just before a commit (``rewrite_check(chain)`` before a delete's
  or retention's rewrite of manifests): checks the lease is still this daemon's
  (unexpired, and still the chain's highest generation) and returns a ``Fence``: the
  generation the manifest records, and ``before_put``, which the storage thread calls just
  before the manifest's put and which checks again if the put comes late
  (``store.recheck_if_late``: a paused process, queued storage calls); a lost lease raises
  ``ChainLeasedError`` and the save fails.
* ``start()`` runs the renewal task: every ``lease_renew_interval_s`` each held lease is
  renewed, or released once its chain saw no write for ``lease_ttl_s``; a renewal that
  finds the lease lost drops it (later saves take it again or are refused).
* ``await close()`` stops the task and releases every held lease, so that after a clean
  shutdown another daemon takes the chains at once instead of waiting for the expiry.

Records do not pile up (``store.prune``, ``store.remove``): a take, once it deleted the
previous holder's void manifests, prunes the chain's older records, and on storage this
daemon holds alone the release of a chain with no step left (its run deleted) removes its
records instead of marking them released.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from ckptd.daemon.config import EngineConfig
from ckptd.daemon.engine.chain import Chain
from ckptd.daemon.errors import ChainLeasedError, StorageError
from ckptd.daemon.logs import fields, get_logger
from ckptd.daemon.pools import Pools
from ckptd.daemon.store import lease as store
from ckptd.daemon.store.index import ChainKey
from ckptd.daemon.store.repository import BeforePut, Repository

log = get_logger("engine")


@dataclass(frozen=True)
class Fence:
    """A lease check before manifest puts (a commit's, or a rewrite's): the generation a
    committed manifest records, and the call the storage thread makes with the step just
    before each manifest's put (``store.recheck_if_late``; ``Repository.BeforePut``)."""

    generation: int
    before_put: BeforePut


@dataclass(frozen=True)
class LeaseClocks:
    """The two times leases are judged by. Expiry is wall-clock seconds (``wall_s``): the
    records are read by other daemons, whose clocks agree with this one's (the store's
    assumption). Idleness is ``monotonic_s``, which a wall-clock step cannot move. Tests
    pass a pair they advance themselves, so a lease expires or idles when the test says
    and not when a loaded machine is slow to run the renewal task."""

    wall_s: Callable[[], float] = time.time
    monotonic_s: Callable[[], float] = time.monotonic


class ChainLeases:
    """This daemon's writer leases, one per chain it writes."""

    def __init__(
        self,
        repository: Repository,
        pools: Pools,
        config: EngineConfig,
        chain_of: Callable[[str, int], Chain],
        *,
        clocks: LeaseClocks | None = None,
    ) -> None:
        self.holder = store.new_holder("ckptd", os.getpid(), uuid.uuid4().hex[:12])
        self._repository = repository
        self._storage = repository.storage
        self._pools = pools
        self._config = config
        self._chain_of = chain_of
        clocks = clocks or LeaseClocks()
        self._clock = clocks.wall_s
        self._monotonic = clocks.monotonic_s
        self._held: dict[ChainKey, store.Lease] = {}
        self._used_at_s: dict[ChainKey, float] = {}  # monotonic: last write through it
        self._task: asyncio.Task[None] | None = None

    def holds(self, run: str, rank: int) -> bool:
        """Whether this daemon writes the chain (its lease is held and unexpired)."""
        lease = self._held.get((run, rank))
        return lease is not None and lease.live(self._clock())

    async def hold(self, chain: Chain) -> store.Lease:
        """This daemon's live lease of ``chain``, taken first if need be (see above)."""
        key = (chain.run, chain.rank)
        self._used_at_s[key] = self._monotonic()
        if self.holds(*key):
            return self._held[key]
        async with chain.lock:
            if self.holds(*key):
                return self._held[key]
            return await self._take(chain)

    async def fence(self, chain: Chain, *, late_after_s: float = store.RECHECK_AFTER_S) -> Fence:
        """The lease check before a commit or a rewrite of ``chain``'s manifests (see
        ``Fence``), after checking in storage that the lease is still this daemon's;
        ``ChainLeasedError`` if it is lost. The put checks again when it comes more than
        ``late_after_s`` after this check (``store.recheck_if_late``)."""
        key = (chain.run, chain.rank)
        lease = self._held.get(key)
        if lease is None:
            raise ChainLeasedError(
                f"this daemon no longer holds the writer lease of {chain.run}/rank{chain.rank} "
                "(it was lost meanwhile: while the save was encoded, or before a delete or "
                "retention rewrote a step); the save is not committed, the rewrite not made"
            )
        checked_wall_s, checked_monotonic_s = self._clock(), self._monotonic()
        check = functools.partial(store.check_current, self._storage, lease,
                                  now_unix_s=checked_wall_s)
        try:
            await self._pools.run_lease(check)
        except ChainLeasedError:
            self._lost(key)
            raise

        loop = asyncio.get_running_loop()

        def before_put(step: int) -> None:
            # Both clocks: the monotonic one stops while the host is suspended, the wall
            # one can step; the longer wait is the one to believe.
            now_wall_s = self._clock()
            waited_s = max(now_wall_s - checked_wall_s, self._monotonic() - checked_monotonic_s)
            if waited_s <= late_after_s:
                return
            # The lease as held now: renewals on the loop replace it while the put waits
            # (one dict read from this storage thread). Checked again in storage, it must
            # still be the same generation, live.
            current = self._held.get(key)
            try:
                if current is None or current.generation != lease.generation:
                    raise ChainLeasedError(
                        f"the manifest of step {step} of {chain.run}/rank{chain.rank} was to be "
                        f"written {waited_s:.0f} s after its lease check, and this daemon no "
                        "longer holds that lease; the save is not committed, the rewrite "
                        "not made")
                store.recheck_if_late(self._storage, current, step, waited_s=waited_s,
                                      now_unix_s=now_wall_s, late_after_s=late_after_s)
            except ChainLeasedError:
                loop.call_soon_threadsafe(self._lost_generation, key, lease.generation)
                raise

        return Fence(lease.generation, before_put)

    async def rewrite_check(self, chain: Chain) -> BeforePut | None:
        """The ``before_put`` of rewrites of ``chain``'s manifests (a delete's rebase,
        retention's), from ``fence``: on shared storage retention and deletes run only
        under this daemon's lease. None where this daemon holds no lease of a chain on
        storage it alone writes (retention of a chain not yet saved to since start): no
        writer to fence.

        Unlike a commit's, a rewrite's check runs before every put, however short the
        wait: a late commit within the grace only adds a manifest its generation voids,
        but a late rewrite replaces one, naming blobs the chain's new holder may already
        have removed as leftovers. Rewrites are rare (deletes, retention), so one storage
        read per rewritten manifest is cheap."""
        if not self._storage.shared and (chain.run, chain.rank) not in self._held:
            return None
        return (await self.fence(chain, late_after_s=0.0)).before_put

    def _lost_generation(self, key: ChainKey, generation: int) -> None:
        """``_lost`` for a lease found lost from a storage thread, unless a newer
        generation was taken meanwhile."""
        held = self._held.get(key)
        if held is not None and held.generation == generation:
            self._lost(key)

    def start(self) -> None:
        self._task = asyncio.create_task(self._renew_every(), name="ckptd-leases")

    async def close(self) -> None:
        """Stops renewing and releases every held lease (best effort: an unreleased lease
        expires by itself)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for key in list(self._held):
            await self._release(key)

    async def renew_all(self) -> None:
        """One renewal round: renew the leases of chains written within ``lease_ttl_s``,
        release the others."""
        idle_after_s = self._monotonic() - self._config.lease_ttl_s
        for key, lease in list(self._held.items()):
            chain = self._chain_of(*key)
            busy = chain.reserved or chain.queued or chain.lock.locked()
            if not busy and self._used_at_s.get(key, 0.0) < idle_after_s:
                await self._release(key)
                continue
            renew = functools.partial(store.renew, self._storage, lease,
                                      ttl_s=self._config.lease_ttl_s, now_unix_s=self._clock())
            try:
                renewed = await self._pools.run_lease(renew)
            except ChainLeasedError as exc:
                log.error("chain lease lost; this daemon stops writing the chain %s",
                          fields(run=key[0], rank=key[1], error=str(exc)))
                self._lost(key)
                continue
            except StorageError as exc:
                log.warning("cannot renew chain lease; retrying %s",
                            fields(run=key[0], rank=key[1], error=str(exc)))
                continue
            if self._held.get(key) is lease:
                self._held[key] = renewed

    async def _renew_every(self) -> None:
        while True:
            await asyncio.sleep(self._config.lease_renew_interval_s)
            try:
                await self.renew_all()
            except Exception:
                log.exception("lease renewal round failed")

    async def _take(self, chain: Chain) -> store.Lease:
        key = (chain.run, chain.rank)
        free = functools.partial(store.check_free, self._storage, chain.run, chain.rank,
                                 self.holder, now_unix_s=self._clock(),
                                 exclusive=not self._storage.shared)
        await self._pools.run_lease(free)
        found = await self._repository.scan_chain(*key)
        after = max((entry.manifest.key.step for entry in found.entries), default=None)
        take = functools.partial(
            store.take, self._storage, chain.run, chain.rank, self.holder,
            ttl_s=self._config.lease_ttl_s, now_unix_s=self._clock(), after_step=after,
            exclusive=not self._storage.shared)
        lease = await self._pools.run_lease(take)
        self._held[key] = lease
        self._repository.replace_chain(key, found.entries)
        latest = max(found.entries, key=lambda e: e.manifest.key.step, default=None)
        head = chain.head
        if head is None or latest is None or (head.step, head.checksum) != (
                latest.manifest.key.step, latest.manifest.checksum):
            chain.invalidate()  # another writer moved the chain: rebuilt from storage
        log.info("chain lease taken %s", fields(
            run=chain.run, rank=chain.rank, generation=lease.generation, after_step=after,
            steps=len(found.entries), leftover_keys=len(found.garbage)))
        if await self._clean(chain, found.garbage):
            await self._prune(lease)
        for moved in await self._repository.quarantine(found.damaged):
            log.error("quarantined a step that may have been committed; see `ckptd ls "
                      "--quarantined` %s", fields(run=chain.run, rank=chain.rank,
                                                   step=moved.key.step, reason=moved.reason))
        return lease

    async def _clean(self, chain: Chain, garbage: list[str]) -> bool:
        """Deletes the previous holder's uncommitted and void step directories (best
        effort: the next taker finds whatever is left); returns whether all went."""
        if not garbage:
            return True
        try:
            await self._pools.run_io(functools.partial(self._storage.delete, garbage))
        except StorageError as exc:
            log.warning("cannot remove a previous writer's leftovers %s",
                        fields(run=chain.run, rank=chain.rank, error=str(exc)))
            return False
        return True

    async def _prune(self, lease: store.Lease) -> None:
        """Deletes the chain's older lease records that fence nothing any more
        (``store.prune``; best effort: the next taker prunes what is left)."""
        prune = functools.partial(store.prune, self._storage, lease, now_unix_s=self._clock(),
                                  exclusive=not self._storage.shared)
        try:
            pruned = await self._pools.run_lease(prune)
        except StorageError as exc:
            log.warning("cannot prune old chain lease records %s",
                        fields(run=lease.run, rank=lease.rank, error=str(exc)))
            return
        if pruned:
            log.info("old chain lease records pruned %s", fields(
                run=lease.run, rank=lease.rank, generations=len(pruned)))

    async def _release(self, key: ChainKey) -> None:
        lease = self._held.pop(key, None)
        self._used_at_s.pop(key, None)
        if lease is None:
            return
        if not self._storage.shared and not self._repository.index.entries(*key):
            await self._remove(key)  # its run was deleted: nothing left to fence
            return
        release = functools.partial(store.release, self._storage, lease,
                                    now_unix_s=self._clock())
        try:
            await self._pools.run_lease(release)
        except (ChainLeasedError, StorageError) as exc:
            log.warning("cannot release chain lease; it expires by itself %s",
                        fields(run=key[0], rank=key[1], error=str(exc)))
            return
        log.info("chain lease released %s", fields(run=key[0], rank=key[1],
                                                     generation=lease.generation))

    async def _remove(self, key: ChainKey) -> None:
        try:
            removed = await self._pools.run_lease(
                functools.partial(store.remove, self._storage, *key))
        except StorageError as exc:
            log.warning("cannot remove the lease records of a chain without steps %s",
                        fields(run=key[0], rank=key[1], error=str(exc)))
            return
        log.info("lease records of a chain without steps removed %s",
                 fields(run=key[0], rank=key[1], records=removed))

    def _lost(self, key: ChainKey) -> None:
        self._held.pop(key, None)
        self._used_at_s.pop(key, None)
