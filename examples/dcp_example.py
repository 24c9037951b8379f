"""Sharded training that checkpoints with torch.distributed.checkpoint through ckptd.

Starts ``--world`` processes on this machine (gloo on CPU; with torchrun or GPUs the
process group comes from your launcher instead), shards a small model with FSDP2
(``fully_shard``) and saves model and optimizer every step with ``dcp.save`` through
``CkptdStorageWriter``: each rank's shards go into its own ckptd chain as deltas, and the
coordinator's commit marks the step complete. ``--resume`` loads the latest complete step
with ``dcp.load`` through ``CkptdStorageReader`` first, on any number of ranks (DCP
reshards), and trains on from there::

    ckptd serve --storage /tmp/ckpts --listen 127.0.0.1:50051 &
    python examples/dcp_example.py --target 127.0.0.1:50051 --world 2 --steps 3
    python examples/dcp_example.py --target 127.0.0.1:50051 --world 1 --steps 2 --resume
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from ckptd.client.dcp import CkptdStorageReader, CkptdStorageWriter
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard


def build(world: int) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
    mesh = init_device_mesh("cpu", (world,))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.Adam(model.parameters(), lr=1e-2)


def train(rank: int, world: int, args: argparse.Namespace, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    model, optimizer = build(world)
    start = 0
    if args.resume:
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optim_state, "step": 0}
        reader = CkptdStorageReader(args.target, args.run)
        dcp.load(state, storage_reader=reader)  # no checkpoint_id: latest complete step
        set_state_dict(model, optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])
        start = int(state["step"])
        if rank == 0:
            print(f"resumed from step {start} on {world} ranks", flush=True)
    writer = CkptdStorageWriter(args.target, args.run)
    for step in range(start + 1, start + args.steps + 1):
        batch = torch.randn(32, 16, generator=torch.Generator().manual_seed(step))
        loss = model(batch).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        model_state, optim_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optim": optim_state, "step": step},
                 storage_writer=writer, checkpoint_id=step)
        if rank == 0:
            print(f"saved step {step} (loss {loss.item():.4f})", flush=True)
    writer.close()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="the daemon: HOST:PORT or unix:///PATH")
    parser.add_argument("--run", default="dcp-example")
    parser.add_argument("--world", type=int, default=2, help="processes to start")
    parser.add_argument("--steps", type=int, default=3, help="training steps to run")
    parser.add_argument("--resume", action="store_true", help="load the latest step first")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = str(Path(tmp) / "process-group")
        mp.spawn(train, args=(args.world, args, init_file), nprocs=args.world, join=True)


if __name__ == "__main__":
    main()
