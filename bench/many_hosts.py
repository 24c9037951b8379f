"""Many hosts: 4 ranks through 2 daemons on one S3 prefix, against 4 ranks through 1 daemon.

Both layouts run in the same invocation, on the same S3-compatible server (moto's, on
loopback, in this process) and the same states, so their ratio is what the second daemon
changes. Daemons are ``ckptd serve`` subprocesses; each rank is a ``Checkpointer`` (gRPC
streaming, as a node daemon reached over TCP is) driven from its own thread.

* **step** — per step, every rank (of a world of 4: ``world_size=4``) calls ``save`` at the
  same instant and waits until its save is DURABLE; the step's time is from the first
  ``save`` call to the last rank durable. That is the time to a *complete* step: the
  daemon that commits a world's last rank records the completion before it reports that
  save durable (checked: ``latest_step()`` is the last step afterwards).
* **restore** — after the last step, every rank restores it at once through its own
  daemon (the chain head in that daemon's memory), then through a daemon that did not save
  it (read from storage, as on a host the rank moved to: the other daemon, or with one
  daemon a second one started for this); time from the first call to the last rank's
  tensors in hand.

The first step (lossless bases) is reported apart from the deltas. Medians over steps and
repetitions; ratios are two-daemon / one-daemon.

Usage (from the repository root)::

    .venv/bin/python bench/many_hosts.py [--mb 16] [--steps 6] [--reps 3]
        [--out bench/out/many_hosts.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from ckptd.client import Checkpointer
from moto.server import ThreadedMotoServer

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.daemon import DaemonProcess

RANKS = 4
BUCKET = "bench"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


def _daemon(url: str, workdir: Path) -> DaemonProcess:
    """A daemon on ``url`` with the bench's S3 credentials and no inherited CKPTD_ settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CKPTD_", "AWS_"))}
    return DaemonProcess(url, workdir=workdir, env={**env, **CREDENTIALS})


def _state(rank: int, step: int, elements: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(rank)
    weight = torch.randn(elements, generator=generator)
    drift = torch.randn(elements, generator=generator) * 1e-3
    return {"weight": weight + step * drift, "step": torch.tensor(step)}


def _all_at_once(calls: Sequence[Callable[[], object]]) -> float:
    """Runs ``calls`` on one thread each, released together; seconds until the last ends."""
    barrier = threading.Barrier(len(calls) + 1)
    errors: list[BaseException] = []

    def run(call: Callable[[], object]) -> None:
        barrier.wait()
        try:
            call()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(call,)) for call in calls]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - started


def _layout(url: str, workdir: Path, daemons: int, args: argparse.Namespace) -> dict[str, Any]:
    """One repetition of one layout: ``daemons`` daemons, ranks spread over them evenly."""
    elements = args.mb * 1_000_000 // 4
    run = f"bench-{daemons}d-{uuid.uuid4().hex[:8]}"
    started = [_daemon(url, workdir) for _ in range(daemons)]
    try:
        home = [started[rank * daemons // RANKS] for rank in range(RANKS)]
        other = [started[(rank * daemons // RANKS + 1) % daemons] for rank in range(RANKS)]
        ranks = [Checkpointer(home[rank].address, run, rank=rank, world_size=RANKS,
                              transport="grpc", connect_timeout_s=60) for rank in range(RANKS)]
        states = [[_state(rank, step, elements) for step in range(args.steps)]
                  for rank in range(RANKS)]
        steps_s = [
            _all_at_once([
                lambda c=ckpt, s=step: c.save(s, states[c.rank][s]).wait_durable(600)
                for ckpt in ranks])
            for step in range(args.steps)]
        last = args.steps - 1
        assert {ckpt.latest_step() for ckpt in ranks} == {last}  # complete on every rank
        own_s = _all_at_once([lambda c=ckpt: c.restore(last) for ckpt in ranks])
        for ckpt in ranks:
            ckpt.close()
        if daemons == 1:
            started.append(_daemon(url, workdir))
            other = [started[1]] * RANKS
        movers = [Checkpointer(other[rank].address, run, rank=rank, world_size=RANKS,
                               transport="grpc", connect_timeout_s=60) for rank in range(RANKS)]
        moved_s = _all_at_once([lambda c=ckpt: c.restore(last) for ckpt in movers])
        restored = movers[0].restore(last)["weight"]
        assert torch.allclose(restored, states[0][last]["weight"], atol=0.05)
        for ckpt in movers:
            ckpt.close()
    finally:
        for daemon in started:
            daemon.stop()
    return {"base_step_s": steps_s[0], "delta_steps_s": steps_s[1:],
            "restore_own_s": own_s, "restore_other_s": moved_s}


def _summary(reps: list[dict[str, Any]]) -> dict[str, float]:
    return {
        "base_step_s": statistics.median(r["base_step_s"] for r in reps),
        "delta_step_s": statistics.median(s for r in reps for s in r["delta_steps_s"]),
        "restore_own_s": statistics.median(r["restore_own_s"] for r in reps),
        "restore_other_s": statistics.median(r["restore_other_s"] for r in reps),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=16, help="MB of float32 state per rank")
    parser.add_argument("--steps", type=int, default=6, help="saves per rank and repetition")
    parser.add_argument("--reps", type=int, default=3, help="repetitions of each layout")
    parser.add_argument("--out", type=Path, default=Path("bench/out/many_hosts.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per S3 request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ.update(CREDENTIALS)
    import boto3

    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(
        Bucket=BUCKET)
    results: dict[int, list[dict[str, Any]]] = {1: [], 2: []}
    try:
        with tempfile.TemporaryDirectory(prefix="ckptd-many-hosts-") as tmp:
            for _rep in range(args.reps):
                for daemons in (1, 2):  # interleaved, so drift in load hits both alike
                    url = f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}?endpoint_url={endpoint}"
                    results[daemons].append(_layout(url, Path(tmp), daemons, args))
    finally:
        server.stop()
    one, two = _summary(results[1]), _summary(results[2])
    report = {
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "load_avg_1m": os.getloadavg()[0]},
        "settings": {"ranks": RANKS, "mb_per_rank": args.mb, "steps": args.steps,
                     "reps": args.reps, "storage": "moto S3 server on loopback"},
        "one_daemon": one,
        "two_daemons": two,
        "ratio_two_over_one": {key: two[key] / one[key] for key in one},
        "raw": {"one_daemon": results[1], "two_daemons": results[2]},
        "note": "step = first save call to the world's step complete (all 4 ranks durable)",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'':18}{'1 daemon':>10}{'2 daemons':>11}{'ratio':>8}")
    for key in one:
        print(f"{key:18}{one[key]:10.3f}{two[key]:11.3f}{two[key] / one[key]:8.2f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
