"""``Retainer``: applies each run's retention policy in the background, a group at a time.

Call order, from the engine on the event loop: ``await load()`` once at start (the stored
policies), then ``schedule(chain)`` for every chain found and after each durable save,
``await set_policy(run, policy)`` when a client sets one, and ``await close()`` at
shutdown. Which steps go is the store's pure rule (``ckptd.daemon.store.retention``: keep
the base, drop what nothing kept needs, and rewrite a kept delta as a base only when that
frees more bytes than it writes — at most one rewrite per commit).

Off the save's critical path: a save is DURABLE before its chain is scheduled, and the
deletions run in one task per chain (``ckptd-retention-{run}-{rank}``). That task takes
the chain's lock for one deletion group at a time (at most ``MAX_GROUP_STEPS`` steps, a
handful of storage calls, no encoding), then replans from the index; the chain's save
worker, waiting for the same FIFO lock, runs between two groups. So a save waits at most
one group, and a backlog (a new policy, a start over an old store) drains a group per turn.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from ckptd.daemon.domain import RetentionPolicy, StepKey
from ckptd.daemon.engine.chain import Chain
from ckptd.daemon.logs import fields, get_logger
from ckptd.daemon.store.repository import Repository
from ckptd.daemon.store.retention import plan

log = get_logger("engine")
Deleted = Callable[[str, int, list[StepKey], float], None]
"""Hears of each group deleted: run, rank, the steps, seconds spent."""


class Retainer:
    """The retention policies of every run and one sweeping task per chain that needs it."""

    def __init__(
        self, repository: Repository, default: RetentionPolicy | None, deleted: Deleted
    ) -> None:
        self._repository = repository
        self._default = default if default is not None and default.prunes else None
        self._policies: dict[str, RetentionPolicy] = {}
        self._deleted = deleted
        self._tasks: dict[tuple[str, int], asyncio.Task[None]] = {}
        self._again: set[tuple[str, int]] = set()
        self._closed = False

    async def load(self) -> None:
        self._policies = await self._repository.policies()

    def policy(self, run: str) -> RetentionPolicy | None:
        """The run's own policy, else the daemon's default (None: keep everything)."""
        return self._policies.get(run, self._default)

    async def set_policy(self, run: str, policy: RetentionPolicy) -> None:
        """Stores ``run``'s policy; the caller schedules its chains."""
        await self._repository.store_policy(run, policy)
        self._policies[run] = policy
        log.info("retention policy set %s", fields(run=run, policy=policy.describe()))

    def schedule(self, chain: Chain) -> None:
        """Makes the chain's sweeper run (again) if its run has a pruning policy."""
        policy = self.policy(chain.run)
        if self._closed or policy is None or not policy.prunes:
            return
        key = (chain.run, chain.rank)
        if key in self._tasks:
            self._again.add(key)
            return
        name = f"ckptd-retention-{chain.run}-{chain.rank}"
        self._tasks[key] = asyncio.create_task(self._sweep(chain), name=name)

    async def close(self) -> None:
        """Stops every sweeper; a group cut short is finished by the next start."""
        self._closed = True
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _sweep(self, chain: Chain) -> None:
        key = (chain.run, chain.rank)
        try:
            while True:
                self._again.discard(key)
                rebases = 1  # per commit: a rewrite encodes a whole base
                while (done := await self._next(chain, rebases)) != "":
                    rebases -= done == "rebased"
                    await asyncio.sleep(0)  # let a waiting save take the lock first
                if key not in self._again:
                    break
        except Exception:
            log.exception("retention failed; retried after the next save %s",
                          fields(run=chain.run, rank=chain.rank))
        finally:
            self._tasks.pop(key, None)

    async def _next(self, chain: Chain, rebases: int) -> str:
        """Deletes the chain's first deletion group ("deleted") or, with none left and
        ``rebases`` allowed, rewrites the delta worth rebasing ("rebased"); "" when there
        is nothing to do."""
        async with chain.lock:
            policy = self.policy(chain.run)
            if policy is None:
                return ""
            index = self._repository.index
            entries = index.entries(chain.run, chain.rank)
            other = sum(e.stored_bytes for rank in index.ranks(chain.run) if rank != chain.rank
                        for e in index.entries(chain.run, rank))
            complete = self._repository.worlds.latest_complete_indexed(chain.run, chain.rank)
            todo = plan(entries, policy, other_bytes=other,
                        also_keep=frozenset(() if complete is None else (complete,)))
            started_s = time.monotonic()
            if not todo.groups:
                if todo.rebase is None or rebases <= 0:
                    return ""
                head = chain.head
                await self._repository.rebase(todo.rebase, (head.step, head.arrays)
                                              if head is not None else None)
                # The head keeps its counters on purpose: choose_kind then places the
                # next bases where a run without retention places them, so later saves
                # encode the same (bit-identical reconstructions). A head rebuilt from
                # storage (after eviction or a restart) counts from the rewritten base.
                spent_s = time.monotonic() - started_s
                log.info("retention rebased a kept step to free the steps before it %s",
                         fields(run=chain.run, rank=chain.rank, step=todo.rebase.step,
                                seconds=round(spent_s, 4)))
                self._deleted(chain.run, chain.rank, [], spent_s)  # its time, no step yet
                return "rebased"
            group = todo.groups[0]
            await self._repository.delete_group(group)
            for step in group:
                chain.invalidate(step.step)
        spent_s = time.monotonic() - started_s
        log.info("retention deleted steps %s", fields(
            run=chain.run, rank=chain.rank, steps=[k.step for k in group],
            policy=policy.describe(), seconds=round(spent_s, 4)))
        self._deleted(chain.run, chain.rank, group, spent_s)
        return "deleted"
