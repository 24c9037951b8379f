"""A minimal trainer that checkpoints through ckptd: the workload of the deploy examples.

It trains a small MLP with Adam on generated data, saves every ``--every`` steps, and on
start resumes from the run's latest durable step, so killing and restarting its container
shows the whole cycle. The trainer images run it; nothing here is specific to a deployment
except the daemon address::

    python example_trainer.py --target unix:///run/ckptd/ckptd.sock --run demo --steps 200
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import torch
from ckptd.client import Checkpointer


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--target", default=os.environ.get("CKPTD_TARGET", "unix:///run/ckptd/ckptd.sock"),
        help="daemon address (default: $CKPTD_TARGET, else the sidecar's unix socket)",
    )
    parser.add_argument("--run", default=os.environ.get("CKPTD_RUN", "example"))
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--steps", type=int, default=200, help="train until this step")
    parser.add_argument("--every", type=int, default=20, help="checkpoint interval in steps")
    parser.add_argument("--transport", default="auto", choices=("auto", "shm", "grpc"))
    parser.add_argument(
        "--connect-timeout-s", type=float, default=60.0,
        help="how long to wait for the daemon (it may be starting or restarting)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.rank)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    inputs, labels = torch.randn(512, 64), torch.randint(0, 10, (512,))

    with Checkpointer(
        args.target, run=args.run, rank=args.rank, transport=args.transport,
        connect_timeout_s=args.connect_timeout_s,
    ) as ckpt:
        start = 0
        latest = ckpt.latest_step()
        if latest is not None:
            state = ckpt.restore(latest)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optim"])
            start = latest
            print(f"resumed run {args.run!r} rank {args.rank} at step {latest}", flush=True)
        for step in range(start + 1, args.steps + 1):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(inputs), labels)
            loss.backward()
            optimizer.step()
            if step % args.every == 0:
                ckpt.save(step, {"model": model.state_dict(), "optim": optimizer.state_dict()})
                print(f"step {step} loss {loss.item():.4f} saved ({ckpt.transport})", flush=True)
        # Exit only once every checkpoint is committed: a job that ends is a job to resume.
        ckpt.wait()
    print(f"done at step {args.steps}; every checkpoint is durable", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
