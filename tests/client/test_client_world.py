"""Worlds through the real daemon: a step is complete once every rank committed it.

Four checkpointers of one run (world_size=4) talk to one in-process daemon, as four ranks
on one host do. Rank 3 never saves step 20: every rank's latest step stays 10, a restore
of 20 names rank 3, and only ``allow_incomplete`` returns a rank's own copy. The
completion record lies in storage (``worlds/{run}/{step:020d}.json``) and is repaired when
missing.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from ckptd.client import Checkpointer, InvalidCheckpointError, Retention, StepIncompleteError
from ckptd.daemon.cli.app import main as cli_main
from ckptd.daemon.config import EngineConfig
from client_support import CheckpointerFactory
from daemon_harness import InProcessDaemon, start_in_process, wait_until

RUN = "world"
WORLD = 4


def _state(rank: int, step: int) -> dict[str, torch.Tensor]:
    return {"w": torch.full((64,), float(rank * 1000 + step)), "step": torch.tensor(step)}


def _ranks(daemon: InProcessDaemon, make: CheckpointerFactory, world: int = WORLD
           ) -> list[Checkpointer]:
    return [make(daemon.address, RUN, rank=rank, world_size=world) for rank in range(world)]


def _save(ranks: list[Checkpointer], step: int, which: range | list[int]) -> None:
    for rank in which:
        ranks[rank].save(step, _state(rank, step))
    for rank in which:
        ranks[rank].wait(60)


def _record(daemon: InProcessDaemon, step: int) -> str:
    return str(daemon.storage_path / "worlds" / RUN / f"{step:020d}.json")


def test_a_step_one_rank_never_saved_is_not_the_latest(
    daemon: InProcessDaemon, make_checkpointer: CheckpointerFactory
) -> None:
    ranks = _ranks(daemon, make_checkpointer)
    _save(ranks, 10, range(WORLD))
    _save(ranks, 20, [0, 1, 2])  # rank 3 never saves step 20

    assert [ckpt.latest_step() for ckpt in ranks] == [10, 10, 10, 10]
    assert [ckpt.steps() for ckpt in ranks] == [[10, 20], [10, 20], [10, 20], [10]]
    for rank, ckpt in enumerate(ranks):
        assert int(ckpt.restore()["step"]) == 10
        assert torch.equal(ckpt.restore()["w"], _state(rank, 10)["w"])
    with pytest.raises(StepIncompleteError, match=r"ranks \[3\]") as raised:
        ranks[0].restore(20)
    assert raised.value.reason == "ERROR_REASON_STEP_INCOMPLETE"
    assert raised.value.code == "FAILED_PRECONDITION"
    own = ranks[1].restore(20, allow_incomplete=True)
    assert torch.equal(own["w"], _state(1, 20)["w"])
    assert int(ranks[2].restore(allow_incomplete=True)["step"]) == 20
    (info,) = [i for i in ranks[0].step_infos() if i.step == 20]
    assert (info.world_size, info.missing_ranks, info.complete) == (WORLD, (3,), False)
    with open(_record(daemon, 10)) as record:
        assert json.load(record)["world_size"] == WORLD
    assert not (daemon.storage_path / "worlds" / RUN / f"{20:020d}.json").exists()

    _save(ranks, 20, [3])  # the last rank completes the world
    assert [ckpt.latest_step() for ckpt in ranks] == [20] * WORLD
    assert int(ranks[0].restore(20)["step"]) == 20
    with open(_record(daemon, 20)) as record:
        assert json.load(record)["manifests"]["3"].startswith(f"runs/{RUN}/3/")


def test_ls_shows_completeness(
    daemon: InProcessDaemon, make_checkpointer: CheckpointerFactory,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ranks = _ranks(daemon, make_checkpointer)
    _save(ranks, 10, range(WORLD))
    _save(ranks, 20, [0, 1, 2])
    assert cli_main(["ls", RUN, "--rank", "0", "--target", daemon.address]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "WORLD" in lines[0]
    assert lines[1].split()[1] == "10" and lines[1].rstrip().endswith("4/4")
    assert lines[2].split()[1] == "20" and lines[2].rstrip().endswith("3/4 missing 3")


def test_a_missing_record_is_repaired_on_restore(
    daemon: InProcessDaemon, make_checkpointer: CheckpointerFactory
) -> None:
    ranks = _ranks(daemon, make_checkpointer, world=2)
    _save(ranks, 5, range(2))
    record = daemon.storage_path / "worlds" / RUN / f"{5:020d}.json"
    expected = record.read_bytes()
    record.unlink()  # as if the daemon crashed between the last commit and the record
    daemon.call(lambda engine: engine._repository.worlds._recorded.clear())
    assert int(ranks[1].restore(5)["step"]) == 5
    assert record.read_bytes() == expected


def test_a_world_size_change_is_refused(
    daemon: InProcessDaemon, make_checkpointer: CheckpointerFactory
) -> None:
    ranks = _ranks(daemon, make_checkpointer, world=2)
    _save(ranks, 1, range(2))
    smaller = make_checkpointer(daemon.address, RUN, rank=0, world_size=1)
    smaller.save(2, _state(0, 2))
    with pytest.raises(InvalidCheckpointError, match=r"world_size 1.*world_size 2"):
        smaller.wait(60)
    alone = make_checkpointer(daemon.address, RUN, rank=1)
    alone.save(3, _state(1, 3))
    with pytest.raises(InvalidCheckpointError, match=r"no world_size.*world_size 2"):
        alone.wait(60)
    with pytest.raises(ValueError, match="rank 2 is outside a world of 2"):
        Checkpointer(daemon.address, RUN, rank=2, world_size=2)


def test_retention_keeps_the_latest_complete_step(
    tmp_path: Path, make_checkpointer: CheckpointerFactory
) -> None:
    """keep_last=1 keeps each rank's newest step and, while some rank lacks it, the latest
    complete one too: without it the run could not be resumed at all."""
    running = start_in_process(tmp_path / "storage", engine=EngineConfig(base_interval=1))
    try:
        ranks = [make_checkpointer(running.address, RUN, rank=0, world_size=2,
                                   retention=Retention(keep_last=1)),
                 make_checkpointer(running.address, RUN, rank=1, world_size=2)]
        _save(ranks, 1, range(2))
        _save(ranks, 2, [0])  # rank 1 never saves steps 2 and 3
        _save(ranks, 3, [0])
        wait_until(lambda: ranks[0].steps() == [1, 3], 30, "rank 0's steps [1, 3]")
        assert [ckpt.latest_step() for ckpt in ranks] == [1, 1]
        assert int(ranks[0].restore()["step"]) == 1
    finally:
        running.stop()
