"""Retention holds the chain's lease before each action on shared storage
(``Retainer(hold=...)``): a sweep that outlives the lease (released while the chain was
idle, or taken by another daemon) neither deletes nor hides steps without it."""

from __future__ import annotations

import asyncio
from pathlib import Path

from ckptd.daemon.domain import RetentionPolicy
from ckptd.daemon.engine.chain import Chain
from ckptd.daemon.engine.retention import Hold, Retainer
from ckptd.daemon.errors import ChainLeasedError
from engine_support import RUN, SMALL, open_engine, random_walk, save


def test_retention_acts_only_under_the_chain_lease(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with open_engine(tmp_path, SMALL) as engine:
            for step, state in enumerate(random_walk(5, 4)):
                await save(engine, step, state)
            chain = engine._chain(RUN, 0)
            policy = RetentionPolicy(keep_last=1)

            async def sweep(hold: Hold) -> None:
                retainer = Retainer(engine._repository, policy, lambda *_: None, hold=hold)
                retainer.schedule(chain)
                await asyncio.gather(*retainer._tasks.values())

            async def taken(held: Chain) -> None:
                raise ChainLeasedError(f"{held.run}/rank{held.rank} is written by daemon-b")

            await sweep(taken)  # stops before its first action, quietly
            assert [i.step for i in engine.list_steps(RUN, 0)] == [0, 1, 2, 3]
            assert not any(e.hidden for e in engine._repository.index.entries(RUN, 0))

            holds: list[int] = []

            async def ours(held: Chain) -> None:
                holds.append(held.rank)

            await sweep(ours)
            # keep_last=1 on base 0 and deltas 1-3: steps 0-2 leave the listing (hidden
            # until step 3 is rewritten as a base, then deleted), each action after a hold.
            assert [i.step for i in engine.list_steps(RUN, 0)] == [3]
            assert len(holds) >= 2

    asyncio.run(scenario())
