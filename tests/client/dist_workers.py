"""Trainer processes for the torch.distributed tests: spawned (``multiprocessing`` spawn
context), so they live in a module the children import by name, not in a test module.

Each worker joins a gloo process group through a file store under the test's
``tmp_path``, talks to the test's daemon over TCP and writes what the test checks
(``torch.save``) under ``out``. Models are tiny: the machine has two cores.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from ckptd.client import Checkpointer
from ckptd.client.dcp import CkptdStorageReader, CkptdStorageWriter
from torch import nn
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Shard, distribute_tensor
from torch.nn.parallel import DistributedDataParallel

EXACT = [("*", "exact")]


@dataclass(frozen=True)
class Job:
    """What a worker does: the daemon and run, where to write results, and its knobs."""

    target: str
    run: str
    out: Path
    crash_step: int = 0  # fsdp_train: the step whose shards the last rank never writes
    exact: bool = True  # dtensor_save: lossless policy (else the daemon's default)
    first: int = 1  # ddp_train: first step to train (> 1: resume from the latest first)
    last: int = 0  # ddp_train: last step to train
    kill_after: int | None = None  # ddp_train: every rank SIGKILLs itself after it
PG_TIMEOUT = timedelta(seconds=120)  # a peer that died makes the others fail, not hang


def _join(rank: int, world: int, init_file: Path) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=PG_TIMEOUT)


def run_rank(fn: Any, rank: int, world: int, init_file: Path, job: Job) -> None:
    """A process's target: ``fn`` for one rank, then its process group torn down. A process
    that exits with gloo's group still up can abort in the group's destructor ("terminate
    called without an active exception", exit -6) after its work succeeded."""
    try:
        fn(rank, world, init_file, job)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))


def _train_step(model: nn.Module, optimizer: torch.optim.Optimizer, step: int) -> None:
    batch = torch.randn(16, 8, generator=torch.Generator().manual_seed(step))
    model(batch).pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad()


def _fsdp(world: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    mesh = init_device_mesh("cpu", (world,))
    model = _model()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.Adam(model.parameters(), lr=0.01)


def _full_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model on every rank (a collective)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return {name: tensor.clone() for name, tensor in get_model_state_dict(
        model, options=options).items()}


class _DiesBeforeWriting(CkptdStorageWriter):
    """A rank that crashes after DCP planned the step, before it saves its shards."""

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Any:
        os.kill(os.getpid(), signal.SIGKILL)


def fsdp_train(rank: int, world: int, init_file: Path, job: Job) -> None:
    """FSDP2 training of 4 ranks saving every step with DCP through ckptd (step 2 with
    ``async_save``); at ``job.crash_step`` the last rank dies before writing its shards."""
    _join(rank, world, init_file)
    model, optimizer = _fsdp(world)
    writer = CkptdStorageWriter(job.target, job.run, policies=EXACT)
    for step in range(1, job.crash_step + 1):
        _train_step(model, optimizer, step)
        if step == job.crash_step and rank == world - 1:
            writer = _DiesBeforeWriting(job.target, job.run, policies=EXACT)
        weights, optim = get_state_dict(model, optimizer)
        state = {"model": weights, "optim": optim, "extra": {"step": step}}
        if step == 2:
            dcp.async_save(state, storage_writer=writer, checkpoint_id=step).result()
        else:
            dcp.save(state, storage_writer=writer, checkpoint_id=step)
        full = _full_weights(model)
        if rank == 0:
            torch.save(full, job.out / f"expected-{step}.pt")
    writer.close()


def fsdp_resume(rank: int, world: int, init_file: Path, job: Job) -> None:
    """Resumes the FSDP2 job on ``world`` ranks (fewer than saved it) from the latest
    complete step, then trains and saves one more step with the new world size."""
    _join(rank, world, init_file)
    model, optimizer = _fsdp(world)
    weights, optim = get_state_dict(model, optimizer)
    state = {"model": weights, "optim": optim, "extra": {"step": -1}}
    reader = CkptdStorageReader(job.target, job.run)
    dcp.load(state, storage_reader=reader, checkpoint_id=None)  # the latest complete step
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"])
    full = _full_weights(model)
    resumed = int(state["extra"]["step"])
    if rank == 0:
        torch.save({"step": resumed, "weights": full}, job.out / "resumed.pt")
    step = resumed + 2  # after the step some ranks kept from the crashed attempt
    _train_step(model, optimizer, step)
    writer = CkptdStorageWriter(job.target, job.run, policies=EXACT)
    weights, optim = get_state_dict(model, optimizer)
    dcp.save({"model": weights, "optim": optim, "extra": {"step": step}},
             storage_writer=writer, checkpoint_id=step)
    writer.close()


def _matrix(step: int) -> torch.Tensor:
    """The full tensor saved at ``step``: steps differ by a small update, as training's do."""
    base = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    return base + 0.01 * step * torch.randn(64, 256, generator=torch.Generator().manual_seed(step))


def dtensor_save(rank: int, world: int, init_file: Path, job: Job) -> None:
    """Saves steps 1 and 2 of a row-sharded tensor from ``world`` ranks with DCP."""
    _join(rank, world, init_file)
    mesh = init_device_mesh("cpu", (world,))
    writer = CkptdStorageWriter(job.target, job.run, policies=EXACT if job.exact else None)
    for step in (1, 2):
        state = {"w": distribute_tensor(_matrix(step), mesh, [Shard(0)]),
                 "bias": torch.arange(4, dtype=torch.int64) + step}
        dcp.save(state, storage_writer=writer, checkpoint_id=step)
    writer.close()


def dtensor_load(rank: int, world: int, init_file: Path, job: Job) -> None:
    """Loads step 2 into ``world`` ranks (a different sharding) and writes the full tensor."""
    _join(rank, world, init_file)
    mesh = init_device_mesh("cpu", (world,))
    state = {"w": distribute_tensor(torch.zeros(64, 256), mesh, [Shard(0)]),
             "bias": torch.zeros(4, dtype=torch.int64)}
    dcp.load(state, storage_reader=CkptdStorageReader(job.target, job.run), checkpoint_id=2)
    full = state["w"].full_tensor()
    if rank == 0:
        torch.save({"w": full, "local_rows": state["w"].to_local().shape[0],
                    "bias": state["bias"]}, job.out / "loaded.pt")


def ddp_train(rank: int, world: int, init_file: Path, job: Job) -> None:
    """DDP on ``world`` ranks; rank 0 saves model and optimizer every step (a world of
    one saver). Resumes from the latest complete step when ``job.first`` > 1; with
    ``job.kill_after``, every rank SIGKILLs itself once that step is durable."""
    _join(rank, world, init_file)
    model = DistributedDataParallel(_model())
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    if job.first > 1:
        with Checkpointer(job.target, job.run, rank=0, world_size=1) as reader:
            restored = reader.restore_info()
        model.module.load_state_dict(restored.state["model"])
        optimizer.load_state_dict(restored.state["optim"])
        if rank == 0:
            torch.save({"step": restored.step, "weights": model.module.state_dict()},
                       job.out / "resumed.pt")
    saver = None
    if rank == 0:
        saver = Checkpointer(job.target, job.run, rank=0, world_size=1, policies=EXACT)
    for step in range(job.first, job.last + 1):
        _train_step(model, optimizer, step)
        if saver is not None:
            saver.save(step, {"model": model.module.state_dict(),
                              "optim": optimizer.state_dict()})
            saver.wait(120)
            torch.save(model.module.state_dict(), job.out / f"expected-{step}.pt")
        dist.barrier()
        if step == job.kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
    if saver is not None:
        saver.close()
