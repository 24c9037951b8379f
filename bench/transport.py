"""The gRPC transport alone, before and after: a save streamed to ACCEPTED and a restore of
the latest step, with each process's CPU seconds.

``bench/pipeline.py`` times gRPC saves to DURABLE, which adds the daemon's encode and write
to the transfer. This benchmark isolates what the transport costs: per size, one state of
transformer-shaped weights (``pipeline.make_state``) and two ``ckptd serve`` daemons on unix
sockets (this code, and ``--before DIR``'s, built as in bench/README.md), and, rep by rep,
interleaved, on each daemon in turn:

* a base (not timed: it only makes the next save a delta, a trainer's steady state), then
  ``save``: a delta from ``save()`` until the daemon ACCEPTED it (every byte received into
  its receive buffers), with the daemon's and this process's CPU seconds over that time;
* ``restore``: a restore of the latest step (the chain's head, in the daemon's memory)
  streamed over gRPC, with the same CPU seconds.

The client is this code on both sides (``--before`` changes the daemon only). Each save also
records both processes' context switches (voluntary and not, all threads: a thread woken
per HTTP/2 window update or per message shows here). ``--daemon-flags "--stream-saves
never"`` makes ACCEPTED the receive alone (no encode running beside it). ``--parts`` also
times, in this process, what the Python code does per chunk of a save (``parts`` in the
JSON): the client's serialization (``encode_chunk``), protobuf's parse and read of
``data``, the hand parser (``streams.decode_request``) and the copy into a receive buffer,
per 256 MiB of ``max_chunk_bytes`` chunks. ``--perf DIR``
also records ``perf record -g`` of both processes during the first rep's save and restore on
each daemon (``DIR/{daemon,client}-{save,restore}-{after,before}.data``; read with ``perf
report -i FILE --children --sort sym --stdio -g none``). Usage::

    python bench/transport.py --before /tmp/ckptd-main/pkg                # 256MiB; 5 reps
    python bench/transport.py --sizes 1GiB --reps 3 --before DIR
    python bench/transport.py --reps 5 --before DIR --daemon-flags "--stream-saves never" --parts

Writes ``bench/out/transport.json`` and prints a markdown summary (medians; *x before* is
this code's median over the before daemon's, same run).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from ckptd.client import Checkpointer
from ckptd.protos import streams
from ckptd.protos.v1 import pb

try:
    from . import pipeline
    from .options import add_size_options
except ImportError:  # run as a script: python bench/transport.py
    import pipeline  # type: ignore[no-redef]
    from options import add_size_options  # type: ignore[no-redef]

OUT_PATH = Path(__file__).resolve().parent / "out" / "transport.json"
SIDES = ("after", "before")


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (all its threads)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def context_switches(pid: int) -> int:
    """Voluntary plus involuntary context switches of all of process ``pid``'s threads."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        # A thread that ended meanwhile is gone from /proc.
        with contextlib.suppress(FileNotFoundError), \
                open(f"/proc/{pid}/task/{tid}/status") as status:
            total += sum(int(line.split()[1]) for line in status
                         if line.startswith(("voluntary_ctxt", "nonvoluntary_ctxt")))
    return total


def own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@contextlib.contextmanager
def perf_recording(out: Path | None, daemon_pid: int, name: str) -> Iterator[None]:
    """``perf record -g`` of the daemon and of this process while the block runs."""
    if out is None:
        yield
        return
    procs = [subprocess.Popen(["perf", "record", "-F", "499", "-g", "-q", "-o",
                               str(out / f"{who}-{name}.data"), "-p", str(pid)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for who, pid in (("daemon", daemon_pid), ("client", os.getpid()))]
    time.sleep(0.5)  # perf attaches asynchronously; nothing to poll for
    try:
        yield
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGINT)
            proc.wait(60)


def measured(call: Callable[[], object], daemon_pid: int) -> tuple[float, float, float]:
    """Wall seconds, daemon CPU seconds and this process's CPU seconds of ``call``."""
    daemon0, own0, began = process_cpu_s(daemon_pid), own_cpu_s(), time.perf_counter()
    call()
    wall = time.perf_counter() - began
    return wall, process_cpu_s(daemon_pid) - daemon0, own_cpu_s() - own0


def one_rep(address: str, pid: int, rep: int, state: dict[str, Any], *, side: str,
            record: dict[str, list[float]], switches: dict[str, list[int]],
            perf_dir: Path | None) -> None:
    with Checkpointer(address, run=f"grpc-{rep}", transport="grpc") as ckpt:
        ckpt.save(1, state).wait_durable()
        pipeline.perturb(state)
        with perf_recording(perf_dir if rep == 0 else None, pid, f"save-{side}"):
            daemon0, own0 = context_switches(pid), context_switches(os.getpid())
            save = measured(lambda: ckpt.save(2, state).wait_accepted(), pid)
            switches[f"daemon_{side}"].append(context_switches(pid) - daemon0)
            switches[f"client_{side}"].append(context_switches(os.getpid()) - own0)
        ckpt.wait()
        with perf_recording(perf_dir if rep == 0 else None, pid, f"restore-{side}"):
            restore = measured(ckpt.restore, pid)
    for what, values in (("save", save), ("restore", restore)):
        for metric, value in zip(("s", "daemon_cpu_s", "client_cpu_s"), values, strict=True):
            record[f"{what}_{metric}_{side}"].append(value)


def measure(label: str, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    state = pipeline.make_state(pipeline.SIZES[label], "weights")
    nbytes = sum(t.nbytes for t in pipeline.tensors(state).values())
    budget = 2 * nbytes + 64 * pipeline.MiB
    record: dict[str, list[float]] = {
        f"{what}_{metric}_{side}": [] for what in ("save", "restore")
        for metric in ("s", "daemon_cpu_s", "client_cpu_s") for side in SIDES}
    switches: dict[str, list[int]] = {f"{who}_{side}": [] for who in ("daemon", "client")
                                      for side in SIDES}
    flags = args.daemon_flags.split()
    with pipeline.serve(root / f"{label}-after", budget, *flags) as after, \
            pipeline.serve(root / f"{label}-before", budget, *flags, code=args.before) as before:
        for rep in range(args.reps):
            for side, proc in (("after", after), ("before", before)):
                one_rep(proc.address, proc.proc.pid, rep, state, side=side, record=record,
                        switches=switches, perf_dir=args.perf)
            print(f"[{label}] rep {rep}: " + ", ".join(
                f"{k} {v[-1]:.2f}" for k, v in record.items()), flush=True)
    for side in SIDES:
        shutil.rmtree(root / f"{label}-{side}")
    return {"size": label, "bytes": nbytes, "seconds": record, "save_switches": switches}


def chunk_parts(chunk_bytes: int, total_bytes: int = 256 * pipeline.MiB) -> dict[str, float]:
    """Seconds per ``total_bytes`` (best of 3) of each step the Python code of a save takes
    per chunk, on one warm chunk (the daemon reuses message memory: ``allocator.py``)."""
    source = np.random.default_rng(0).integers(0, 255, chunk_bytes, dtype=np.uint8)
    message = streams.encode_chunk(1, 0, memoryview(source))
    parsed = pb.SaveRequest.FromString(message)
    data = parsed.chunk.data
    target = np.ones(chunk_bytes, np.uint8)
    steps: dict[str, Callable[[], object]] = {
        "client: encode_chunk (one copy)": lambda: streams.encode_chunk(1, 0, memoryview(source)),
        "daemon: protobuf parse": lambda: pb.SaveRequest.FromString(message),
        "daemon: protobuf read of data": lambda: parsed.chunk.data,
        "daemon: hand parse (a view)": lambda: streams.decode_request(message),
        "daemon: copy into the receive buffer": lambda: np.copyto(
            target, np.frombuffer(data, np.uint8)),
    }
    count = max(1, total_bytes // chunk_bytes)
    out = {}
    for name, step in steps.items():
        best = math.inf
        for _ in range(3):
            began = time.perf_counter()
            for _ in range(count):
                step()
            best = min(best, time.perf_counter() - began)
        out[name] = best
    return out


def report_lines(cases: list[dict[str, Any]], parts: dict[str, float] | None = None,
                 chunk_bytes: int = pipeline.MiB) -> list[str]:
    out = ["| size | what | side | wall s | MB/s | daemon CPU s | client CPU s | x before "
           "| switches daemon / client |",
           "|---|---|---|---|---|---|---|---|---|"]
    for case in cases:
        s = {k: statistics.median(v) for k, v in case["seconds"].items()}
        for what in ("save", "restore"):
            for side in SIDES:
                wall = s[f"{what}_s_{side}"]
                ratio = wall / s[f"{what}_s_before"]
                shown = "" if what == "restore" else " / ".join(
                    f"{statistics.median(case['save_switches'][f'{who}_{side}']):.0f}"
                    for who in ("daemon", "client"))
                out.append(
                    f"| {case['size']} | {what} | {side} | {wall:.3f} "
                    f"| {case['bytes'] / wall / 1e6:.0f} | {s[f'{what}_daemon_cpu_s_{side}']:.2f} "
                    f"| {s[f'{what}_client_cpu_s_{side}']:.2f} | {ratio:.2f} | {shown} |")
    if parts:
        out += ["", f"| per 256 MiB of {chunk_bytes >> 20} MiB chunks | ms |", "|---|---|"]
        out += [f"| {name} | {seconds * 1e3:.1f} |" for name, seconds in parts.items()]
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_size_options(parser, sizes="256MiB", reps=5, out=OUT_PATH, before="required")
    parser.add_argument("--perf", type=Path, default=None,
                        help="record perf profiles of the first rep into this directory")
    parser.add_argument("--daemon-flags", default="",
                        help='more "ckptd serve" flags for both daemons, e.g. '
                             '"--stream-saves never" (ACCEPTED = the receive alone)')
    parser.add_argument("--parts", action="store_true",
                        help="also time the Python steps of a save per chunk, in this process")
    parser.add_argument("--chunk-bytes", type=int, default=pipeline.MiB,
                        help="chunk size for --parts (the daemon's max_chunk_bytes)")
    args = parser.parse_args(argv)
    unknown = [s for s in args.sizes if s not in pipeline.SIZES]
    if unknown:
        parser.error(f"unknown sizes {unknown}; choose from {list(pipeline.SIZES)}")
    if args.perf is not None:
        args.perf.mkdir(parents=True, exist_ok=True)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="ckptd-transport-", dir=args.workdir) as tmp:
        cases = [measure(label, args, Path(tmp)) for label in args.sizes]
    parts = chunk_parts(args.chunk_bytes) if args.parts else None
    summary = report_lines(cases, parts, args.chunk_bytes)
    report = {
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "load_average_start": load_start, "load_average_end": os.getloadavg()[0],
        "command": " ".join(["python bench/transport.py", *(argv or sys.argv[1:])]),
        "cases": cases, "parts": parts, "summary": summary,
    }  # fmt: skip
    pipeline.write_report(args.out, report, summary)


if __name__ == "__main__":
    main()
