"""A save that loses its step to another writer at the commit point leaves the winner's
step whole: its blobs carry the saving writer's own tag, and its manifest is not deleted.

Two writers reach one chain's commit only when both passed the lease fence (a writer
stalled past its lease while another took over, ``ckptd.daemon.store.lease``); the test
plays the other writer by placing its committed step in storage just before the commit.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from ckptd.daemon.domain import StepKey
from ckptd.daemon.store.index import IndexEntry
from ckptd.daemon.store.manifest import Manifest, manifest_key
from ckptd.protos.records import SaveState
from engine_support import RUN, WAIT_S, Tensor, assert_same, open_engine, save, send


def _state(seed: int) -> dict[str, Tensor]:
    rng = np.random.default_rng(seed)
    return {"w": Tensor(rng.standard_normal(1 << 14, dtype=np.float32)),
            "b": Tensor(rng.standard_normal(64, dtype=np.float32))}


def test_a_save_that_loses_the_commit_race_keeps_the_winners_step(tmp_path: Path) -> None:
    first, ours, theirs = _state(1), _state(2), _state(3)
    winner, loser = tmp_path / "winner", tmp_path / "loser"
    step_dir = Path("runs") / RUN / "0" / f"{2:020d}"

    async def scenario() -> None:
        async with open_engine(winner) as engine:  # the other writer: same step 1
            await save(engine, 1, first)
            await save(engine, 2, theirs)
            expected = await engine.restore(RUN, 0, 2)
        async with open_engine(loser) as engine:
            await save(engine, 1, first)
            repository = engine._pipeline._repository
            commit = repository.commit

            async def commit_after_the_winner(manifest: Manifest, **kwargs: Any) -> IndexEntry:
                if manifest.key.step == 2:  # the winner's step lands first
                    shutil.copytree(winner / step_dir, loser / step_dir, dirs_exist_ok=True)
                return await commit(manifest, **kwargs)

            repository.commit = commit_after_the_winner
            accepted = await send(engine, 2, ours)
            assert accepted.state is SaveState.ACCEPTED
            final = await engine.wait(accepted.key, WAIT_S)
            assert final.state is SaveState.FAILED
            assert "committed by another writer" in final.error
        stored = sorted(p.name for p in (loser / step_dir).iterdir())
        assert stored == sorted(p.name for p in (winner / step_dir).iterdir())
        assert (loser / manifest_key(StepKey(RUN, 0, 2))).exists()
        async with open_engine(loser) as engine:  # a restart indexes the winner's step
            assert [info.step for info in engine.list_steps(RUN, 0)] == [1, 2]
            assert_same(await engine.restore(RUN, 0, 2), expected)

    asyncio.run(scenario())
