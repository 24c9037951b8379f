"""Restore alone, before and after, client included: ckptd against ``torch.load``.

``bench/pipeline.py`` times restores after a rep's saves, with this code's client on both
sides of its before/after. This benchmark does restores only, many interleaved reps, and
runs the *before* side's client in a subprocess on the ``--before`` code too, so a change
on the client (how the restored bytes reach the tensors) is measured as well as one in the
daemon. Per size, one state of transformer-shaped weights (``pipeline.make_state``) is
saved to two ``ckptd serve`` daemons (this code, and ``--before DIR``'s), as a base and one
delta; then, rep by rep, in this order:

* ``torch_load``: ``torch.load(weights_only=True)`` of the same state from a file in the
  page cache (the baseline of every ratio);
* ``latest_shm`` / ``latest_shm_before``: a restore of the latest step (the chain's head,
  in the daemon's memory) through shared memory (unix socket), copied out of the segment;
* ``latest_shm_views``: the same with ``zero_copy=True`` (views of the segment; after only);
* ``latest_grpc`` / ``latest_grpc_before``: the same streamed over gRPC;
* ``base_shm`` / ``base_shm_before``: a restore of step 1, the base, from storage (only a
  chain's head stays in memory, so it is read and decoded every time).

Every restore returns its tensors and drops them inside the timed call, as ``torch.load``'s
timing does. Each restore also records the CPU seconds it cost each side (``cpu``): the
client's process (its gRPC threads included) and the daemon's, read from
``/proc/PID/stat`` around the call; on two shared cores they move far less than the wall
seconds between reps, so they show where a change saved work. Usage::

    python bench/restore.py --before /tmp/ckptd-main/pkg            # 256MiB,1GiB; 7 reps
    python bench/restore.py --sizes 256MiB --reps 5 --before DIR

Writes ``bench/out/restore.json`` and prints a markdown summary (medians; ratios over the
same run's ``torch.load``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from ckptd.client import Checkpointer

try:
    from . import pipeline
    from .options import add_size_options
except ImportError:  # run as a script: python bench/restore.py
    import pipeline  # type: ignore[no-redef]
    from options import add_size_options  # type: ignore[no-redef]

OUT_PATH = Path(__file__).resolve().parent / "out" / "restore.json"
CASES = ("latest_shm", "latest_shm_views", "latest_grpc", "base_shm")
AFTER_ONLY = ("latest_shm_views",)
# The before side's client: one process on the --before code, told what to restore on
# stdin, answering each line with the seconds it took (timed in that process).
BEFORE_CLIENT = """
import sys, time, ckptd.client
from ckptd.client import Checkpointer
print(ckptd.client.__file__, flush=True)
clients = {t: Checkpointer(sys.argv[1], run="r", transport=t) for t in ("shm", "grpc")}
for line in sys.stdin:
    transport, step = line.split()
    began, cpu = time.perf_counter(), time.process_time()
    clients[transport].restore(None if step == "latest" else int(step))
    print(time.perf_counter() - began, time.process_time() - cpu, flush=True)
"""


def save_chain(address: str, state: dict[str, Any]) -> None:
    """Step 1 a base, step 2 a delta: the head in memory is step 2."""
    with Checkpointer(address, run="r", transport="shm") as ckpt:
        ckpt.save(1, state).wait_durable()
        pipeline.perturb(state)
        ckpt.save(2, state).wait_durable()


def daemon_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """Times restores on the wall and in CPU seconds of this process and of a daemon."""

    def __init__(self, daemon_pid: int, record: dict[str, list[float]],
                 cpu: dict[str, list[list[float]]]) -> None:
        self.daemon_pid, self.record, self.cpu = daemon_pid, record, cpu

    def run(self, case: str, call: Callable[[], object]) -> None:
        daemon, client = daemon_cpu_s(self.daemon_pid), time.process_time()
        self.record[case].append(pipeline.timed(call))
        self.cpu[case].append([time.process_time() - client,
                               daemon_cpu_s(self.daemon_pid) - daemon])


def measure(label: str, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    state = pipeline.make_state(pipeline.SIZES[label], "weights")
    nbytes = sum(t.nbytes for t in pipeline.tensors(state).values())
    print(f"[{label}] {nbytes / pipeline.MiB:.0f} MiB", flush=True)
    budget = 2 * nbytes + 64 * pipeline.MiB
    record: dict[str, list[float]] = {"torch_load": []}
    record.update({f"{c}{s}": [] for c in CASES for s in ("", "_before")
                   if not (s and c in AFTER_ONLY)})
    cpu: dict[str, list[list[float]]] = {case: [] for case in record if case != "torch_load"}
    path = root / "state.pt"
    with pipeline.serve(root / f"{label}-after", budget) as after, \
            pipeline.serve(root / f"{label}-before", budget, code=args.before) as before:
        save_chain(after.address, state)
        save_chain(before.address, state)
        torch.save(state, path)
        del state
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (str(args.before), os.environ.get("PYTHONPATH")) if p)}
        with subprocess.Popen([sys.executable, "-c", BEFORE_CLIENT, before.address], env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as old, \
                Checkpointer(after.address, run="r", transport="shm") as shm, \
                Checkpointer(after.address, run="r", transport="grpc") as grpc:
            assert old.stdin is not None and old.stdout is not None
            print(f"[{label}] before client: {old.stdout.readline().strip()}", flush=True)

            meter = CpuMeter(after.proc.pid, record, cpu)

            def before_side(case: str, transport: str, step: str) -> None:
                daemon = daemon_cpu_s(before.proc.pid)
                old.stdin.write(f"{transport} {step}\n")  # type: ignore[union-attr]
                old.stdin.flush()  # type: ignore[union-attr]
                wall, client = old.stdout.readline().split()  # type: ignore[union-attr]
                record[case].append(float(wall))
                cpu[case].append([float(client), daemon_cpu_s(before.proc.pid) - daemon])

            for rep in range(args.reps):
                record["torch_load"].append(
                    pipeline.timed(lambda: torch.load(path, weights_only=True)))
                meter.run("latest_shm", shm.restore)
                before_side("latest_shm_before", "shm", "latest")
                meter.run("latest_shm_views", lambda: shm.restore(zero_copy=True))
                meter.run("latest_grpc", grpc.restore)
                before_side("latest_grpc_before", "grpc", "latest")
                meter.run("base_shm", lambda: shm.restore(1))
                before_side("base_shm_before", "shm", "1")
                print(f"[{label}] rep {rep}: " + ", ".join(
                    f"{k} {v[-1]:.3f}" for k, v in record.items()), flush=True)
            old.stdin.close()
        restores = {which: pipeline.stage_lines(root / f"{label}-{which}", "restore served")
                    for which in ("after", "before")}
    path.unlink()
    return {"size": label, "bytes": nbytes, "seconds": record, "cpu": cpu,
            "restores": restores}


def summary(cases: list[dict[str, Any]]) -> list[str]:
    lines = ["| size | case | ckptd / torch.load | (before) | ckptd s | (before) s | "
             "torch.load s | client cpu s | (before) | daemon cpu s | (before) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    nan = float("nan")
    for case in cases:
        s = {k: pipeline.median(v) for k, v in case["seconds"].items()}
        cpu = {k: [pipeline.median([rep[side] for rep in v]) for side in (0, 1)]
               for k, v in case.get("cpu", {}).items()}
        load = s["torch_load"]
        for name in CASES:
            before = s.get(f"{name}_before", nan)
            client, daemon = cpu.get(name, [nan, nan])
            client_b, daemon_b = cpu.get(f"{name}_before", [nan, nan])
            lines.append(
                f"| {case['size']} | {name} | {s[name] / load:.2f} | {before / load:.2f} | "
                f"{s[name]:.3f} | {before:.3f} | {load:.3f} | {client:.3f} | {client_b:.3f} | "
                f"{daemon:.3f} | {daemon_b:.3f} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_size_options(parser, sizes="256MiB,1GiB", reps=7, out=OUT_PATH, before="required")
    args = parser.parse_args(argv)
    run_sizes("python bench/restore.py", args, argv,
              lambda label, root: measure(label, args, root), summary)


def run_sizes(
    command: str, args: argparse.Namespace, argv: list[str] | None,
    measure_size: Callable[[str, Path], dict[str, Any]],
    summarize: Callable[[list[dict[str, Any]]], list[str]],
) -> None:
    """Measures each of ``args.sizes`` in a scratch directory under ``args.workdir`` and
    writes the report (when, load average, torch, the command, cases, summary) to
    ``args.out``."""
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    load_at_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="ckptd-restore-", dir=args.workdir) as tmp:
        cases = [measure_size(label, Path(tmp)) for label in args.sizes]
    lines = summarize(cases)
    report = {"started_at": started, "load_average_start": load_at_start,
              "load_average_end": os.getloadavg(), "torch": torch.__version__,
              "command": " ".join([command, *(argv or sys.argv[1:])]),
              "cases": cases, "summary": lines}
    pipeline.write_report(args.out, report, lines)

if __name__ == "__main__":
    main()
