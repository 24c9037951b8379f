"""torch.distributed through ckptd: gloo on CPU, spawned trainer processes, the real daemon.

* FSDP2 (``fully_shard``) with 4 ranks saves every step with ``dcp.save``/``async_save``
  through ``CkptdStorageWriter``; at step 4 rank 3 dies after planning, before writing.
  Every rank's latest complete step is 3, a restore of 4 names the ranks that lack it,
  and 2 ranks resume from step 3 through ``CkptdStorageReader`` (DCP reshards 4 -> 2),
  with the very weights the 4 ranks had (lossless policy), then save with world size 2.
* A DTensor sharded over 4 ranks, saved at steps 1 and 2 and loaded by 2 ranks: equal to
  the original with the lossless policy, within the lossy bound with the default one.
* DDP with 2 ranks, rank 0 saving: both ranks are SIGKILLed after a durable step and
  resume from it.

The workers live in ``dist_workers`` (the children import it by name).
"""

from __future__ import annotations

import multiprocessing
import signal
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import dist_workers
import pytest
import torch
from ckptd.client import Checkpointer, StepIncompleteError
from client_support import CheckpointerFactory
from daemon_harness import InProcessDaemon, start_in_process
from dist_workers import Job

pytestmark = pytest.mark.slow
JOIN_TIMEOUT_S = 240.0


@pytest.fixture
def tcp_daemon(tmp_path: Path) -> Iterator[InProcessDaemon]:
    """The daemon over TCP: the workers are other processes, as on other hosts."""
    running = start_in_process(tmp_path / "storage")
    yield running
    running.stop()


def _spawn(fn: Callable[..., None], world: int, tmp_path: Path, job: Job,
           ) -> list[multiprocessing.process.BaseProcess]:
    """Starts ``fn(rank, world, init_file, job)`` on ``world`` fresh interpreters."""
    init_file = tmp_path / f"pg-{uuid.uuid4().hex}"  # a file store serves one group only
    context = multiprocessing.get_context("spawn")
    procs = [context.Process(target=dist_workers.run_rank, args=(fn, rank, world, init_file, job))
             for rank in range(world)]
    for proc in procs:
        proc.start()
    return procs


def _join(procs: list[multiprocessing.process.BaseProcess]) -> list[int | None]:
    for proc in procs:
        proc.join(JOIN_TIMEOUT_S)
        if proc.exitcode is None:
            proc.kill()
            proc.join()
    return [proc.exitcode for proc in procs]


def _run(fn: Callable[..., None], world: int, tmp_path: Path, job: Job) -> None:
    assert _join(_spawn(fn, world, tmp_path, job)) == [0] * world


def test_fsdp_ranks_resume_from_the_latest_complete_step_on_fewer_ranks(
    tcp_daemon: InProcessDaemon, make_checkpointer: CheckpointerFactory, tmp_path: Path
) -> None:
    run, target = "fsdp", tcp_daemon.address
    crashing = Job(target, run, tmp_path, crash_step=4)
    codes = _join(_spawn(dist_workers.fsdp_train, 4, tmp_path, crashing))
    assert codes[3] == -signal.SIGKILL  # the others fail on the dead peer
    ranks = [make_checkpointer(target, run, rank=rank) for rank in range(4)]
    assert [ckpt.latest_step() for ckpt in ranks] == [3, 3, 3, 3]
    assert [max(ckpt.steps()) for ckpt in ranks] == [3, 4, 4, 3]
    with pytest.raises(StepIncompleteError, match=r"ranks \[0, 3\]"):
        ranks[1].restore(4)

    _run(dist_workers.fsdp_resume, 2, tmp_path, Job(target, run, tmp_path))
    resumed = torch.load(tmp_path / "resumed.pt")
    expected = torch.load(tmp_path / "expected-3.pt")
    assert resumed["step"] == 3
    assert resumed["weights"].keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(resumed["weights"][name], tensor), name
    assert ranks[0].latest_step() == 5  # saved by a world of 2: resharded through DCP
    assert [info.world_size for info in ranks[0].step_infos()][-2:] == [4, 2]


@pytest.mark.parametrize("exact", [True, False], ids=["lossless", "lossy"])
def test_dcp_save_with_4_ranks_loads_on_2(
    tcp_daemon: InProcessDaemon, make_checkpointer: CheckpointerFactory, tmp_path: Path,
    exact: bool,
) -> None:
    run, target = "dtensor", tcp_daemon.address
    _run(dist_workers.dtensor_save, 4, tmp_path, Job(target, run, tmp_path, exact=exact))
    _run(dist_workers.dtensor_load, 2, tmp_path, Job(target, run, tmp_path))
    loaded = torch.load(tmp_path / "loaded.pt")
    original = dist_workers._matrix(2)
    assert loaded["local_rows"] == 32  # resharded: 2 ranks of 32 rows, saved as 4 of 16
    assert torch.equal(loaded["bias"], torch.arange(4) + 2)
    error = (loaded["w"] - original).abs()
    if exact:
        assert error.max().item() == 0.0
    else:
        # A lossy delta against step 1 (a base, stored exactly): each element's error is at
        # most its own change since step 1 (LC-Checkpoint's bound; 1e-6 for float rounding).
        change = (original - dist_workers._matrix(1)).abs()
        assert error.max().item() > 0.0
        assert bool((error <= change + 1e-6).all())
    kinds = [info.kind for info in make_checkpointer(target, run, rank=1).step_infos()]
    assert kinds == ["base", "delta"]  # rank 1's shard of step 2 is a delta against step 1


def test_ddp_ranks_killed_after_a_durable_step_resume_from_it(
    tcp_daemon: InProcessDaemon, tmp_path: Path
) -> None:
    run, target = "ddp", tcp_daemon.address
    crashing = Job(target, run, tmp_path, first=1, last=9, kill_after=3)
    codes = _join(_spawn(dist_workers.ddp_train, 2, tmp_path, crashing))
    assert codes == [-signal.SIGKILL, -signal.SIGKILL]
    _run(dist_workers.ddp_train, 2, tmp_path, Job(target, run, tmp_path, first=4, last=5))
    resumed = torch.load(tmp_path / "resumed.pt")
    expected = torch.load(tmp_path / "expected-3.pt")
    assert resumed["step"] == 3
    for name, tensor in expected.items():
        assert torch.equal(resumed["weights"][name], tensor), name
    with Checkpointer(target, run, rank=0, world_size=1) as ckpt:
        assert ckpt.steps() == [1, 2, 3, 4, 5]
        assert ckpt.latest_step() == 5
