"""``Retainer``: applies each run's retention policy in the background, a group at a time.

Call order, from the engine on the event loop: ``await load()`` once at start (the stored
policies), then ``schedule(chain)`` for every chain found and after each durable save,
``await set_policy(run, policy)`` when a client sets one, and ``await close()`` at
shutdown. Which steps go is the store's pure rule (``ckptd.daemon.store.retention``: delete
what nothing kept needs, hide what the policy drops but a kept step still restores
through, and rewrite a kept delta as a base only when the hidden steps before it outweigh
the rewrite: one base for a step kept for good, four for the ``keep_last`` window's — at
most one rewrite per commit).

Off the save's critical path: a save is DURABLE before its chain is scheduled, and the
work runs in one task per chain (``ckptd-retention-{run}-{rank}``). That task takes the
chain's lock for one bounded action at a time (delete or hide at most ``MAX_GROUP_STEPS``
steps: a handful of storage calls, no encoding; or the one rewrite), then replans from the
index; the chain's save worker, waiting for the same FIFO lock, runs between two actions.
So a save waits at most one action, and a backlog (a new policy, a start over an old
store) drains an action per turn.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from ckptd.daemon.domain import RetentionPolicy, StepKey
from ckptd.daemon.engine.chain import Chain
from ckptd.daemon.errors import ChainLeasedError
from ckptd.daemon.logs import fields, get_logger
from ckptd.daemon.store.deletion import PAUSE_POINTS, Pause
from ckptd.daemon.store.repository import BeforePut, Repository
from ckptd.daemon.store.retention import MAX_GROUP_STEPS, plan

log = get_logger("engine")


def pause_for_tests(spec: str) -> Pause | None:
    """The deleter's pause for ``EngineConfig.test_pause_at`` ("POINT:PATH"; "" is None):
    at POINT it writes PATH (the point's name) and waits until the process is killed.
    Harmless unless set: a test hook, documented as one (README, settings)."""
    if not spec:
        return None
    point, _, path = spec.partition(":")
    if point not in PAUSE_POINTS:
        raise ValueError(f"test_pause_at names point {point!r}; known: {PAUSE_POINTS}")

    async def pause(reached: str) -> None:
        if reached != point:
            return
        log.warning("paused for a test until killed %s", fields(point=point, path=path))
        await asyncio.to_thread(Path(path).write_text, point)
        await asyncio.Event().wait()

    return pause

RewriteCheck = Callable[[Chain], Awaitable[BeforePut | None]]
"""The lease check before a chain's manifests are rewritten (``ChainLeases.rewrite_check``)."""
Hold = Callable[[Chain], Awaitable[object]]
"""The chain's lease, taken again if it was released while idle (``ChainLeases.hold``)."""
Deleted = Callable[[str, int, list[StepKey], float], None]
"""Hears of each action: run, rank, the steps it removed from users' view (deleted, or
hidden; a rewrite removes none), seconds spent under the chain's lock."""


class Retainer:
    """The retention policies of every run and one sweeping task per chain that needs it."""

    def __init__(
        self, repository: Repository, default: RetentionPolicy | None, deleted: Deleted,
        rewrite_check: RewriteCheck | None = None, hold: Hold | None = None,
    ) -> None:
        """``rewrite_check(chain)``: the lease check a rewrite's manifest puts make
        (``ChainLeases.rewrite_check``); None: no leases. ``hold(chain)``: on shared
        storage, the chain's lease before each action (``ChainLeases.hold``: it counts as
        the chain's use, so a long sweep keeps it, and takes it again if it was released
        while idle); a chain another daemon holds stops the sweep. None: no leases."""
        self._repository = repository
        self._rewrite_check = rewrite_check
        self._hold = hold
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
        """Makes the chain's sweeper run (again) if its run has a pruning policy or the
        chain holds hidden steps (whose bytes go once nothing kept needs them)."""
        policy = self.policy(chain.run)
        prunes = policy is not None and policy.prunes
        if self._closed or not (prunes or self._has_hidden(chain)):
            return
        key = (chain.run, chain.rank)
        if key in self._tasks:
            self._again.add(key)
            return
        name = f"ckptd-retention-{chain.run}-{chain.rank}"
        self._tasks[key] = asyncio.create_task(self._sweep(chain), name=name)

    def _has_hidden(self, chain: Chain) -> bool:
        return any(e.hidden for e in self._repository.index.entries(chain.run, chain.rank))

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
        except ChainLeasedError as exc:  # another daemon writes the chain now: its business
            log.info("retention stopped: %s %s", exc, fields(run=chain.run, rank=chain.rank))
        except Exception:
            log.exception("retention failed; retried after the next save %s",
                          fields(run=chain.run, rank=chain.rank))
        finally:
            self._tasks.pop(key, None)

    async def _next(self, chain: Chain, rebases: int) -> str:
        """One action under the chain's lock: delete the first deletion group
        ("deleted"), else hide the dropped steps a kept one needs ("hidden"), else, with
        ``rebases`` allowed, rewrite the delta worth it ("rebased"); "" when nothing is
        left to do."""
        if self._hold is not None:
            await self._hold(chain)  # before the lock: taking a lease takes it too
        async with chain.lock:
            policy = self.policy(chain.run) or RetentionPolicy()
            index = self._repository.index
            entries = index.entries(chain.run, chain.rank)
            other = sum(e.stored_bytes for rank in index.ranks(chain.run) if rank != chain.rank
                        for e in index.entries(chain.run, rank))
            complete = self._repository.worlds.latest_complete_indexed(chain.run, chain.rank)
            todo = plan(entries, policy, other_bytes=other,
                        also_keep=frozenset(() if complete is None else (complete,)))
            started_s = time.monotonic()
            if todo.groups:
                group = todo.groups[0]
                removed = [key for key in group if (entry := index.get(key)) is not None
                           and not entry.hidden]  # hidden ones were counted when hidden
                await self._repository.delete_group(group)
                for step in group:
                    chain.invalidate(step.step)
                done, what = "deleted", "retention deleted steps %s"
            elif todo.hide:
                group = removed = todo.hide[:MAX_GROUP_STEPS]
                await self._repository.hide(group)
                done, what = "hidden", ("retention removed steps a kept step still restores "
                                        "through; their data stays hidden %s")
            elif todo.rebase is not None and rebases > 0:
                await self._rebase(chain, todo.rebase)
                group, removed = [todo.rebase], []
                done, what = "rebased", ("retention rewrote a kept step as a base to free "
                                         "the hidden steps before it %s")
            else:
                return ""
        spent_s = time.monotonic() - started_s
        log.info(what, fields(run=chain.run, rank=chain.rank, steps=[k.step for k in group],
                              policy=policy.describe(), seconds=round(spent_s, 4)))
        self._deleted(chain.run, chain.rank, removed, spent_s)
        return done

    async def _rebase(self, chain: Chain, key: StepKey) -> None:
        head = chain.head
        before_put = (await self._rewrite_check(chain) if self._rewrite_check is not None
                      else None)
        await self._repository.rebase(key, (head.step, head.arrays) if head else None,
                                      before_put=before_put)
        # The head keeps its counters on purpose: choose_kind then places the next bases
        # where a run without retention places them, so later saves encode the same
        # (bit-identical reconstructions). A head rebuilt from storage (after eviction or
        # a restart) counts from the rewritten base.
