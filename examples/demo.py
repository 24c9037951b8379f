"""ckptd end to end on one machine: daemon, trainer, crash, resume, and what it all cost.

This is the README's first command. It starts ``ckptd serve`` on a local storage directory
(the embedded default), trains the digits CNN of ``examples/train_digits.py`` with a
checkpoint every few steps, SIGKILLs the trainer mid-run, starts it again from the latest
durable step, and prints what happened: the steps kept (base or delta), the bytes on disk
against ``torch.save`` of the same checkpoints, and how long each ``save()`` held the
training loop against how long ``torch.save`` takes for the same state.

    python examples/demo.py [--workdir DIR] [--steps 120] [--every 5] [--kill-at 47]

The work directory (storage, socket, logs) is kept afterwards: inspect it with
``ckptd ls --storage DIR/store``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ckptd.client import Checkpointer

HERE = Path(__file__).resolve().parent
READY_TIMEOUT_S = 60.0
RUN = "digits-demo"


def start_daemon(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """Starts ``ckptd serve`` on ``workdir/store``; returns it once it is serving."""
    ready = workdir / "daemon.ready.json"
    log = (workdir / "daemon.log").open("wb")
    target = f"unix://{workdir / 'ckptd.sock'}"
    command = [
        sys.executable, "-m", "ckptd.daemon.cli", "serve",
        "--storage", str(workdir / "store"), "--listen", target, "--ready-file", str(ready),
    ]
    print(f"$ ckptd serve --storage {workdir / 'store'} --listen {target}", flush=True)
    daemon = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not ready.exists():
        if daemon.poll() is not None or time.monotonic() > deadline:
            daemon.kill()
            sys.exit(f"demo: the daemon did not start; see {workdir / 'daemon.log'}")
        time.sleep(0.05)
    return daemon, target


def train(target: str, args: argparse.Namespace, *extra: str) -> int:
    """Runs the example trainer, echoing its output indented; returns its exit code."""
    command = [
        sys.executable, str(HERE / "train_digits.py"), "--target", target, "--run", RUN,
        "--steps", str(args.steps), "--every", str(args.every), "--optimizer", "sgd",
        "--stats", str(args.workdir / "stats.jsonl"), *extra,
    ]
    print(f"$ python examples/train_digits.py ... {' '.join(extra)}", flush=True)
    trainer = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert trainer.stdout is not None
    for line in trainer.stdout:
        print(f"    {line.decode(errors='replace').rstrip()}", flush=True)
    return trainer.wait()


def summarize(target: str, workdir: Path) -> dict[str, Any]:
    """What the daemon kept, against what torch.save would have written and cost."""
    with Checkpointer(target, RUN) as ckpt:
        infos = ckpt.step_infos()
    rows = [json.loads(line) for line in (workdir / "stats.jsonl").read_text().splitlines()]
    torch_bytes = {row["step"]: row["torch_save_bytes"] for row in rows}
    on_disk = sum(f.stat().st_size for f in (workdir / "store").rglob("*") if f.is_file())
    kept_torch = sum(torch_bytes[info.step] for info in infos)
    deltas = [info for info in infos if info.kind == "delta"]
    return {
        "steps": [info.step for info in infos],
        "bases": sum(info.kind == "base" for info in infos),
        "deltas": len(deltas),
        "bytes_on_disk": on_disk,
        "torch_save_bytes": kept_torch,
        "delta_ratio_vs_torch_save": statistics.median(
            torch_bytes[d.step] / d.stored_bytes for d in deltas
        ) if deltas else float("nan"),
        "stall_ms_median": statistics.median(row["stall_ms"] for row in rows),
        "stall_ms_max": max(row["stall_ms"] for row in rows),
        "torch_save_ms_median": statistics.median(row["torch_save_ms"] for row in rows),
    }


def report(summary: dict[str, Any], killed_rc: int, resumed_rc: int) -> None:
    steps = summary["steps"]
    mib = 1 << 20
    print("\nwhat happened")
    print(f"  first trainer  : SIGKILLed (exit {killed_rc}); resumed trainer: exit {resumed_rc}")
    print(f"  steps kept     : {len(steps)} ({steps[0]}..{steps[-1]}), "
          f"{summary['bases']} base + {summary['deltas']} delta")
    print(f"  bytes on disk  : {summary['bytes_on_disk'] / mib:.2f} MiB (all files of the store) "
          f"vs {summary['torch_save_bytes'] / mib:.2f} MiB as torch.save files "
          f"= {summary['torch_save_bytes'] / summary['bytes_on_disk']:.1f}x smaller")
    print(f"  one delta      : {summary['delta_ratio_vs_torch_save']:.1f}x smaller than "
          f"torch.save of the same state (median)")
    print(f"  stall per save : median {summary['stall_ms_median']:.2f} ms "
          f"(max {summary['stall_ms_max']:.2f} ms) vs torch.save "
          f"{summary['torch_save_ms_median']:.2f} ms (median)")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=None, help="default: a new temp dir")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--kill-at", type=int, default=47)
    args = parser.parse_args(argv)
    if not 0 < args.every <= args.kill_at < args.steps:
        parser.error("need 0 < --every <= --kill-at < --steps")
    args.workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="ckptd-demo-"))).resolve()
    args.workdir.mkdir(parents=True, exist_ok=True)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    print(f"demo work directory: {args.workdir}", flush=True)
    daemon, target = start_daemon(args.workdir)
    try:
        killed = train(target, args, "--kill-at", str(args.kill_at))
        if killed != -signal.SIGKILL:
            print(f"demo: expected the first trainer to be killed, it exited {killed}")
            return 1
        resumed = train(target, args, "--resume")
        if resumed != 0:
            print(f"demo: the resumed trainer failed (exit {resumed})")
            return 1
        report(summarize(target, args.workdir), killed, resumed)
    finally:
        daemon.send_signal(signal.SIGTERM)  # drains every accepted save, then exits 0
        drained = daemon.wait(timeout=120)
    print(f"\ndaemon stopped (exit {drained}); inspect with: "
          f"ckptd ls --storage {args.workdir / 'store'}")
    return 0 if drained == 0 else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
