"""Train a small CNN on scikit-learn's 8x8 digits, checkpointing through ckptd.

Start a daemon, train with a checkpoint every 10 steps, crash on purpose at step 45, then
resume from the latest durable step and finish::

    ckptd serve --storage /tmp/ckptd-store --listen unix:///tmp/ckptd.sock &
    python examples/train_digits.py --target unix:///tmp/ckptd.sock --run digits \\
        --steps 100 --every 10 --kill-at 45
    python examples/train_digits.py --target unix:///tmp/ckptd.sock --run digits \\
        --steps 100 --every 10 --resume

The state saved is what a real trainer saves: the model's and the optimizer's
``state_dict()`` plus plain Python values. Batches are drawn from a generator seeded by
(seed, step), so a resumed run sees the same data order it would have seen uninterrupted.
``--dump-dir`` writes ``saved-<step>.pt`` (the state handed to each save) and
``restored-<step>.pt`` (the state a resume got back) so tests can compare them.
``--stats FILE`` appends one JSON line per save: the time ``save()`` held the training loop,
and, for comparison, the time and size of ``torch.save`` of the same state to local disk
(timed after the save, so it never adds to the stall it is compared with).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

# The example lives in the repository next to bench/, whose digits module holds the model
# and the data loader shared by the benchmarks.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ckptd.client import Checkpointer, CheckpointNotFoundError

from bench.digits import build_model, load_data


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", required=True, help="daemon address: host:port or unix:///path")
    parser.add_argument("--run", default="digits", help="run name under which steps are saved")
    parser.add_argument("--steps", type=int, default=200, help="train until this step")
    parser.add_argument("--every", type=int, default=10, help="checkpoint every this many steps")
    parser.add_argument("--resume", action="store_true", help="restore the latest step first")
    parser.add_argument(
        "--kill-at",
        type=int,
        default=None,
        metavar="N",
        help="SIGKILL this process at step N, after that step's save if any",
    )
    parser.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    parser.add_argument("--width", type=int, default=16, help="channels of the first conv")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bits", type=int, default=None, help="lossy bit width (daemon default)")
    parser.add_argument("--exact", action="store_true", help="store every tensor losslessly")
    parser.add_argument("--transport", choices=("auto", "grpc", "shm"), default="auto")
    parser.add_argument(
        "--snapshot",
        choices=("copy", "overlap"),
        default="copy",
        help="copy before save() returns, or during the next forward/backward (guarded)",
    )
    parser.add_argument(
        "--dump-dir",
        type=Path,
        default=None,
        help="debug: torch.save each saved and each restored state here",
    )
    parser.add_argument(
        "--stats",
        type=Path,
        default=None,
        help="append per-save JSON lines (stall, torch.save time and bytes) to this file",
    )
    return parser.parse_args(argv)


def make_optimizer(name: str, model: nn.Module) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=1e-3)
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def batch_for(step: int, seed: int, n: int, batch_size: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.randint(0, n, (batch_size,), generator=generator)


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(images).argmax(dim=1) == labels).float().mean())


def record_stats(path: Path, step: int, stall_s: float, state: dict[str, Any]) -> None:
    """Appends one save's stall next to ``torch.save`` of the same state to local disk."""
    scratch = path.with_name(f".torch-save-{os.getpid()}.pt")
    began = time.perf_counter()
    torch.save(state, scratch)
    torch_save_s = time.perf_counter() - began
    row = {
        "step": step,
        "stall_ms": stall_s * 1e3,
        "torch_save_ms": torch_save_s * 1e3,
        "torch_save_bytes": scratch.stat().st_size,
    }
    scratch.unlink()
    with path.open("a") as stats:
        stats.write(json.dumps(row) + "\n")


def resume(
    ckpt: Checkpointer, model: nn.Module, optimizer: torch.optim.Optimizer, dump_dir: Path | None
) -> int:
    """Loads the latest durable step into model and optimizer; returns it (0: none)."""
    try:
        restored = ckpt.restore_info()
    except CheckpointNotFoundError:
        print(f"no checkpoint of run {ckpt.run!r} yet; starting fresh", flush=True)
        return 0
    model.load_state_dict(restored.state["model"])
    optimizer.load_state_dict(restored.state["optim"])
    if dump_dir is not None:
        torch.save(restored.state, dump_dir / f"restored-{restored.step}.pt")
    print(f"resumed from step {restored.step} (loss then {restored.state['loss']:.4f})", flush=True)
    return restored.step


def train(args: argparse.Namespace) -> None:
    images, labels = load_data()
    torch.manual_seed(args.seed)
    model = build_model(args.width)
    optimizer = make_optimizer(args.optimizer, model)
    loss_fn = nn.CrossEntropyLoss()
    if args.dump_dir is not None:
        args.dump_dir.mkdir(parents=True, exist_ok=True)
    policies = [("*", "exact")] if args.exact else None
    with Checkpointer(
        args.target, args.run, transport=args.transport, bits=args.bits, policies=policies,
        snapshot=args.snapshot,
    ) as ckpt:  # fmt: skip
        # With snapshot="overlap", optimizer.step() waits for a copy still in flight.
        ckpt.guard(model, optimizer)
        print(
            f"connected to {ckpt.target} (transport {ckpt.transport}, pid {os.getpid()})",
            flush=True,
        )
        start = resume(ckpt, model, optimizer, args.dump_dir) if args.resume else 0
        stalls, skipped, loss = [], 0, float("nan")
        for step in range(start + 1, args.steps + 1):
            index = batch_for(step, args.seed, len(labels), args.batch_size)
            optimizer.zero_grad(set_to_none=True)
            batch_loss = loss_fn(model(images[index]), labels[index])
            batch_loss.backward()
            optimizer.step()
            loss = float(batch_loss.detach())
            if step % args.every == 0:
                state: dict[str, Any] = {
                    "model": model.state_dict(),
                    "optim": optimizer.state_dict(),
                    "step": step,
                    "loss": loss,
                }
                began = time.perf_counter()
                handle = ckpt.save(step, state)
                stalls.append(time.perf_counter() - began)
                skipped += handle.skipped
                if args.dump_dir is not None:
                    torch.save(state, args.dump_dir / f"saved-{step}.pt")
                if args.stats is not None:
                    record_stats(args.stats, step, stalls[-1], state)
                print(
                    f"step {step}: loss {loss:.4f}, checkpoint handed over in "
                    f"{stalls[-1] * 1e3:.2f} ms",
                    flush=True,
                )
            if step == args.kill_at:
                print(f"killing this process at step {step} (simulated crash)", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
        ckpt.wait()
        print(
            f"done: step {args.steps}, loss {loss:.4f}, accuracy "
            f"{accuracy(model, images, labels):.3f}, {len(stalls)} checkpoints "
            f"({skipped} skipped), latest durable step {ckpt.latest_step()}",
            flush=True,
        )


def main(argv: list[str] | None = None) -> None:
    train(parse_args(argv))


if __name__ == "__main__":
    main()
