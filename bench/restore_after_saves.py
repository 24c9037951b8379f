"""The latest-step restore right after a chain's saves: this daemon against ``--before``'s.

Why: ``bench/pipeline.py`` restores the latest step right after a rep's base, delta and
next delta, with this code's client on both of its daemons, and one 1 GiB run measured
2.01x ``torch.load`` for this code's daemon against 1.18x for the before one (5 reps,
bench/README.md, "Merged, one run (2026-12-05, second stop)"): code, or the kernel still
writing back and reclaiming the saves' page cache while the restore faults in fresh memory?
This benchmark repeats just that, with more reps, and measures each restore twice:

* ``hot``: right after the third save is durable (what the pipeline times), with the
  dirty and writeback bytes of ``/proc/meminfo`` at its start;
* ``settled``: after ``sync`` and a wait for ``Dirty:`` + ``Writeback:`` to drop under
  ``--settle-mib`` (``settle``), so that writeback is not in the measurement.

Per rep, both daemons (this code, and ``--before DIR``'s, with this client: as in the
pipeline) get a new run (base, delta, next delta over shared memory, then the two
restores), in alternating order (rep 0 this code first, rep 1 the before one first, ...)
so that neither side always follows the other's saves; ``torch.load`` of the same state
from a file in the page cache, settled the same way, is the baseline of every ratio. Each
restore records its wall seconds, the client's CPU seconds and the daemon's. Usage::

    python bench/restore_after_saves.py --sizes 256MiB --reps 15 --before DIR
    flock /work/bench-1g.lock python bench/restore_after_saves.py --sizes 1GiB --reps 7 \
        --before DIR --max-resident-bytes 2214592512   # heads: 2 GiB + 64 MiB per daemon

Writes ``bench/out/restore_after_saves.json`` and prints a markdown table of medians.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import torch
from ckptd.client import Checkpointer

try:
    from . import pipeline
    from .options import add_size_options
    from .restore import daemon_cpu_s, run_sizes
except ImportError:  # run as a script: python bench/restore_after_saves.py
    import pipeline  # type: ignore[no-redef]
    from options import add_size_options  # type: ignore[no-redef]
    from restore import daemon_cpu_s, run_sizes  # type: ignore[no-redef]

OUT_PATH = Path(__file__).resolve().parent / "out" / "restore_after_saves.json"
SIDES = ("after", "before")
WHEN = ("hot", "settled")
MEMINFO = Path("/proc/meminfo")


def unwritten_bytes() -> int:
    """``Dirty:`` + ``Writeback:`` of /proc/meminfo: page cache not yet on disk."""
    total = 0
    for line in MEMINFO.read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Dirty", "Writeback"):
            total += int(value.split()[0]) * 1024
    return total


def settle(limit_bytes: int, timeout_s: float = 30.0) -> float:
    """``sync``, then waits (polling, at most ``timeout_s``) until the machine's dirty and
    writeback bytes are under ``limit_bytes``; returns the seconds it took. The machine is
    shared, so another job's writes may keep it above the limit until the timeout."""
    began = time.perf_counter()
    os.sync()
    while unwritten_bytes() > limit_bytes and time.perf_counter() - began < timeout_s:
        time.sleep(0.05)
    return time.perf_counter() - began


def timed_restore(ckpt: Checkpointer, daemon_pid: int) -> dict[str, float]:
    """One latest-step restore (its tensors dropped inside, as ``torch.load``'s are)."""
    unwritten = unwritten_bytes()
    daemon, client = daemon_cpu_s(daemon_pid), time.process_time()
    wall = pipeline.timed(ckpt.restore)
    return {"wall_s": wall, "client_cpu_s": time.process_time() - client,
            "daemon_cpu_s": daemon_cpu_s(daemon_pid) - daemon,
            "unwritten_mib_at_start": unwritten / pipeline.MiB}


def one_side(address: str, pid: int, run: str, state: dict[str, Any],
             limit_bytes: int) -> dict[str, dict[str, float]]:
    """A new run's base, delta and next delta, then the hot and the settled restore."""
    with Checkpointer(address, run=run, transport="shm") as ckpt:
        for step in (1, 2, 3):
            if step > 1:
                pipeline.perturb(state)
            ckpt.save(step, state).wait_durable()
        hot = timed_restore(ckpt, pid)
        waited = settle(limit_bytes)
        return {"hot": hot, "settled": {**timed_restore(ckpt, pid), "settle_s": waited}}


def measure(label: str, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    state = pipeline.make_state(pipeline.SIZES[label], "weights")
    nbytes = sum(t.nbytes for t in pipeline.tensors(state).values())
    print(f"[{label}] {nbytes / pipeline.MiB:.0f} MiB", flush=True)
    budget = 2 * nbytes + 64 * pipeline.MiB
    limit = args.settle_mib * pipeline.MiB
    path = root / "state.pt"
    record: dict[str, list[Any]] = {"torch_load": [], "after": [], "before": []}
    flags = ("--max-resident-bytes", str(args.max_resident_bytes)) \
        if args.max_resident_bytes is not None else ()
    with pipeline.serve(root / f"{label}-after", budget, *flags) as after, \
            pipeline.serve(root / f"{label}-before", budget, *flags, code=args.before) as before:
        daemons = {"after": after, "before": before}
        for rep in range(args.reps):
            torch.save(state, path)
            settle(limit)
            record["torch_load"].append(
                pipeline.timed(lambda: torch.load(path, weights_only=True)))
            for side in SIDES if rep % 2 == 0 else SIDES[::-1]:
                daemon = daemons[side]
                record[side].append(one_side(daemon.address, daemon.proc.pid, f"r{rep}",
                                             state, limit))
            print(f"[{label}] rep {rep}: torch_load {record['torch_load'][-1]:.3f}, " + ", ".join(
                f"{side} {when} {record[side][-1][when]['wall_s']:.3f}"
                for side in SIDES for when in WHEN), flush=True)
    path.unlink(missing_ok=True)
    return {"size": label, "bytes": nbytes, "settle_mib": args.settle_mib, "seconds": record}


def summary(cases: list[dict[str, Any]]) -> list[str]:
    lines = ["| size | restore | side | ckptd / torch.load | ckptd s | torch.load s | "
             "client cpu s | daemon cpu s | unwritten MiB at start | wall s, each rep |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for case in cases:
        seconds = case["seconds"]
        load = pipeline.median(seconds["torch_load"])
        for when in WHEN:
            for side in SIDES:
                reps = [rep[when] for rep in seconds[side]]
                med = {f: pipeline.median([r[f] for r in reps]) for f in reps[0]}
                each = ", ".join(f"{r['wall_s']:.2f}" for r in reps)
                lines.append(
                    f"| {case['size']} | {when} | {side} | {med['wall_s'] / load:.2f} | "
                    f"{med['wall_s']:.3f} | {load:.3f} | {med['client_cpu_s']:.3f} | "
                    f"{med['daemon_cpu_s']:.3f} | {med['unwritten_mib_at_start']:.0f} | "
                    f"{each} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_size_options(parser, sizes="256MiB", reps=7, out=OUT_PATH, before="required")
    parser.add_argument("--settle-mib", type=int, default=64,
                        help="dirty + writeback MiB under which a settled restore starts")
    parser.add_argument("--max-resident-bytes", type=int, default=None,
                        help="both daemons' bound on chain heads kept in memory (default: "
                        "theirs, 4 GiB); every rep's run keeps its head until evicted")
    args = parser.parse_args(argv)
    run_sizes("python bench/restore_after_saves.py", args, argv,
              lambda label, root: measure(label, args, root), summary)


if __name__ == "__main__":
    main()
