"""The chain leases of one ``ckptd rm --storage`` on shared storage (an object store).

A direct deletion writes a chain like a daemon does: it rewrites the step after a deleted
one as a lossless base (a manifest put) before it deletes anything. So it holds each
chain's writer lease (``ckptd.daemon.store.lease``) the way ``ChainLeases`` does, from the
same store-level rules, only for as long as one deletion runs:

* ``take`` before the deletion, refused (``ChainLeasedError`` naming the holder) while a
  daemon's lease of the chain is live; the fencing point is the latest step the caller
  listed once ``check_free`` passed.
* ``renewing(work)`` runs the deletion on the caller's event loop beside a task that renews
  every held lease each ``ttl_s / 3`` (``store.renew``, on the lease thread, never behind
  the rebase's blob writes), so a long rebase never outlives its lease while this process
  runs. A renewal that finds the lease lost (the process was paused past its expiry and a
  daemon took the chain) marks it lost; nothing more is written under it.
* ``before_put(run, rank)`` is the ``Repository.rewrite`` hook the storage thread calls
  just before each rewritten manifest's put: refused once the lease is known lost, and
  checked again in storage (``store.recheck_if_late``) when the last check (take or
  renewal) is older than one renewal interval: a new holder deletes leftovers when it
  takes the chain (the rebase's new blobs among them), so a put after the lease could have
  expired must not land. (A daemon's rewrites check before every put; here the renewals,
  on the same loop as the deletion, keep a check at most one interval old while it runs.)
* ``check(run, rank)`` before a deletion that rewrites nothing (``delete_chain``): the
  lease is still this process's; ``release_all`` at the end (best effort: an unreleased
  lease expires by itself).

Called from one thread (the catalog's), except ``before_put`` (a storage thread: dict
reads only).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import uuid
from collections.abc import Awaitable
from typing import TypeVar

from ckptd.daemon.engine.lease import LeaseClocks
from ckptd.daemon.errors import ChainLeasedError, StorageError
from ckptd.daemon.pools import Pools
from ckptd.daemon.storage import Storage
from ckptd.daemon.store import lease as store
from ckptd.daemon.store.index import ChainKey
from ckptd.daemon.store.repository import BeforePut

T = TypeVar("T")


class RmLeases:
    """The leases one direct deletion holds, renewed while it runs."""

    def __init__(self, storage: Storage, pools: Pools, *, ttl_s: float,
                 clocks: LeaseClocks) -> None:
        self.holder = store.new_holder("ckptd rm", os.getpid(), uuid.uuid4().hex[:12])
        self._storage = storage
        self._pools = pools
        self._ttl_s = ttl_s
        self._clocks = clocks
        self._held: dict[ChainKey, store.Lease] = {}
        # (wall, monotonic) when each lease was last checked in storage (take or renewal).
        self._checked: dict[ChainKey, tuple[float, float]] = {}
        self._lost: dict[ChainKey, str] = {}

    @property
    def renew_interval_s(self) -> float:
        """Seconds between renewals; also how old a check may be before a put checks again."""
        return self._ttl_s / 3

    def check_free(self, run: str, rank: int) -> None:
        """``ChainLeasedError`` while another holder's lease of the chain is live."""
        store.check_free(self._storage, run, rank, self.holder, now_unix_s=self._clocks.wall_s())

    def take(self, run: str, rank: int, *, after_step: int | None) -> None:
        """Takes the chain's next lease generation, fenced at ``after_step``."""
        checked = self._now()
        self._held[(run, rank)] = store.take(
            self._storage, run, rank, self.holder, ttl_s=self._ttl_s, now_unix_s=checked[0],
            after_step=after_step)
        self._checked[(run, rank)] = checked

    async def renewing(self, work: Awaitable[T]) -> T:
        """Awaits ``work`` while every held lease is renewed each ``renew_interval_s``."""
        task = asyncio.create_task(self._renew_every(), name="ckptd-rm-leases")
        try:
            return await work
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def before_put(self, run: str, rank: int) -> BeforePut:
        """The check a rewrite of the chain's manifests runs just before each put."""
        key = (run, rank)

        def check(step: int) -> None:
            lost = self._lost.get(key)
            if lost is not None:
                raise ChainLeasedError(
                    f"the manifest of step {step} of {run}/rank{rank} was not rewritten: this "
                    f"deletion lost the chain's lease while it ran ({lost})")
            checked_wall_s, checked_monotonic_s = self._checked[key]
            now_wall_s, now_monotonic_s = self._now()
            # Both clocks, as a daemon's fence: the longer wait is the one to believe.
            waited_s = max(now_wall_s - checked_wall_s, now_monotonic_s - checked_monotonic_s)
            store.recheck_if_late(self._storage, self._held[key], step, waited_s=waited_s,
                                  now_unix_s=now_wall_s, late_after_s=self.renew_interval_s)

        return check

    def check(self, run: str, rank: int) -> None:
        """``ChainLeasedError`` unless this deletion still holds the chain's lease."""
        key = (run, rank)
        if key in self._lost:
            raise ChainLeasedError(f"this deletion lost the lease of {run}/rank{rank} while "
                                   f"it ran ({self._lost[key]})")
        store.check_current(self._storage, self._held[key], now_unix_s=self._clocks.wall_s())

    def release_all(self) -> None:
        """Releases every lease still held (best effort: it expires by itself)."""
        for key, held in list(self._held.items()):
            del self._held[key]
            if key not in self._lost:
                with contextlib.suppress(StorageError, ChainLeasedError):
                    store.release(self._storage, held, now_unix_s=self._clocks.wall_s())

    def _now(self) -> tuple[float, float]:
        return self._clocks.wall_s(), self._clocks.monotonic_s()

    async def _renew_every(self) -> None:
        while True:
            await asyncio.sleep(self.renew_interval_s)
            for key, held in list(self._held.items()):
                if key not in self._lost:
                    await self._renew(key, held)

    async def _renew(self, key: ChainKey, held: store.Lease) -> None:
        checked = self._now()
        renew = functools.partial(store.renew, self._storage, held, ttl_s=self._ttl_s,
                                  now_unix_s=checked[0])
        try:
            renewed = await self._pools.run_lease(renew)
        except ChainLeasedError as exc:
            self._lost[key] = str(exc)
            return
        except StorageError:
            return  # retried next round; a put meanwhile checks again once this one is old
        if self._held.get(key) is held:
            self._held[key] = renewed
            self._checked[key] = checked
