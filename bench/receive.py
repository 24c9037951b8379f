"""A save's receive alone: the daemon copying a shared-memory segment into its buffers.

Why it exists: ``bench/pipeline.py`` showed the receive of a delta (``receive_s``) costing
far more than one copy of its bytes. This times the daemon's own code for that step
(``shm.copy_into`` filling a ``SaveSession``, no gRPC, no event loop) on the tensor table
of ``pipeline.make_state`` (transformer-shaped weights), rep by rep, interleaved:

* ``fresh``: into new buffers (``np.empty``), as every save did before
  ``ckptd.daemon.engine.buffers``: the copy faults in every page;
* ``reused``: into the buffers of the previous rep, handed back to a ``ReceiveBuffers``
  as the pipeline does once a delta is encoded;
* ``prepared``: into new buffers made ready beforehand the way ``ckptd.daemon.engine.prefill``
  makes them once a chain's save is durable (one write per page); ``prepare`` is the time
  that took, off the receive's path (between saves, in the daemon's I/O pool);
* ``mapped_copy``: for scale only, ``np.copyto`` of the whole segment through a mapping
  into a reused buffer (one memcpy; the daemon never maps a client's segment: a client
  that shrinks it would SIGBUS the daemon).

Usage::

    python bench/receive.py                  # 256MiB, 7 reps
    python bench/receive.py --sizes 256MiB,1GiB --reps 5

Writes ``bench/out/receive.json`` and prints a markdown table (medians, wall and CPU
seconds of this process). The segment has a unique name and is unlinked on every path.
"""

from __future__ import annotations

import argparse
import mmap
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ckptd.daemon.domain import CheckpointHeader, SaveStatus, StepKey, TensorSpec
from ckptd.daemon.engine.budget import ByteBudget
from ckptd.daemon.engine.buffers import ReceiveBuffers
from ckptd.daemon.engine.prefill import mapped_buffer
from ckptd.daemon.engine.session import SaveSession
from ckptd.daemon.server import shm
from ckptd.protos import segments

try:
    from . import pipeline, stall
    from .options import add_size_options
except ImportError:  # run as a script: python bench/receive.py
    import pipeline  # type: ignore[no-redef]
    import stall  # type: ignore[no-redef]
    from options import add_size_options  # type: ignore[no-redef]

OUT_PATH = Path(__file__).resolve().parent / "out" / "receive.json"
CASES = ("fresh", "reused", "prepared", "prepare", "mapped_copy")


def table(label: str) -> tuple[CheckpointHeader, list[np.ndarray]]:
    """The pipeline benchmark's weights at ``label``, as a save header and byte arrays."""
    state = pipeline.make_state(pipeline.SIZES[label], "weights")
    flat = pipeline.tensors(state)
    arrays = [t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
              for t in flat.values()]
    specs = tuple(TensorSpec(name, str(t.dtype).removeprefix("torch."), tuple(t.shape))
                  for name, t in flat.items())
    return CheckpointHeader(StepKey("receive", 0, 1), specs), arrays


def write_segment(name: str, arrays: list[np.ndarray]) -> shm.SegmentRef:
    """Creates ``/dev/shm/name`` holding ``arrays`` at aligned offsets (as a client's)."""
    offsets, total = segments.aligned_offsets([a.nbytes for a in arrays])
    fd = os.open(shm.SHM_ROOT / name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, total)
        for array, offset in zip(arrays, offsets, strict=True):
            os.pwrite(fd, array, offset)
    finally:
        os.close(fd)
    return shm.SegmentRef(name, total, offsets)


def receive(header: CheckpointHeader, segment: shm.OpenSegment,
            allocate: Callable[[int], np.ndarray] | None) -> list[np.ndarray]:
    """The daemon's receive of one save: a session's buffers filled by ``copy_into``."""

    async def never(_: SaveSession) -> SaveStatus:
        raise AssertionError("not committed here")

    session = SaveSession(header, never, lambda _: None, allocate=allocate)
    shm.copy_into(session, segment)
    return [a for a in session.take_arrays() if a is not None]


def measure(label: str, reps: int) -> dict[str, Any]:
    header, arrays = table(label)
    name = f"ckptd-bench-receive-{os.getpid()}-{time.monotonic_ns()}"
    ref = write_segment(name, arrays)
    seconds: dict[str, list[float]] = {case: [] for case in CASES}
    cpu: dict[str, list[float]] = {case: [] for case in CASES}
    try:
        fd = os.open(shm.SHM_ROOT / name, os.O_RDONLY)
        pool = ReceiveBuffers(ByteBudget(4 * header.nbytes))
        for array, sent in zip(receive(header, shm.OpenSegment(ref, os.dup(fd)), pool.take),
                               arrays, strict=True):
            if array.tobytes() != sent.tobytes():
                raise AssertionError("the receive did not copy the segment's bytes")
            pool.give_back(array)  # the buffers of an earlier save
        whole = np.empty(ref.segment_bytes, np.uint8)
        whole.fill(0)
        ready = ReceiveBuffers(ByteBudget(4 * header.nbytes))
        with mmap.mmap(fd, ref.segment_bytes, prot=mmap.PROT_READ) as mapping:
            runs: dict[str, Callable[[], object]] = {
                "fresh": lambda: receive(header, shm.OpenSegment(ref, os.dup(fd)), None),
                "reused": lambda: [pool.give_back(a) for a in receive(
                    header, shm.OpenSegment(ref, os.dup(fd)), pool.take)],
                "prepare": lambda: [ready.give_back(mapped_buffer(spec.nbytes))
                                    for spec in header.tensors],
                "prepared": lambda: (receive(header, shm.OpenSegment(ref, os.dup(fd)),
                                             ready.take), ready.clear()),
                "mapped_copy": lambda: np.copyto(whole, np.frombuffer(mapping, np.uint8)),
            }
            for _ in range(reps):
                for case, run in runs.items():
                    began, began_cpu = time.perf_counter(), time.process_time()
                    run()
                    seconds[case].append(time.perf_counter() - began)
                    cpu[case].append(time.process_time() - began_cpu)
        os.close(fd)
    finally:
        os.unlink(shm.SHM_ROOT / name)
    return {"size": label, "bytes": header.nbytes, "tensors": len(header.tensors),
            "seconds": seconds, "cpu_seconds": cpu}


def report_lines(cases: list[dict[str, Any]]) -> list[str]:
    out = ["| size | receive | wall s | cpu s | GB/s | / fresh |", "|---|---|---|---|---|---|"]
    for case in cases:
        fresh = statistics.median(case["seconds"]["fresh"])
        for name in CASES:
            wall = statistics.median(case["seconds"][name])
            used = statistics.median(case["cpu_seconds"][name])
            out.append(f"| {case['size']} | {name} | {wall:.3f} | {used:.3f} "
                       f"| {case['bytes'] / wall / 1e9:.2f} | {wall / fresh:.2f} |")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_size_options(parser, sizes="256MiB", reps=7, out=OUT_PATH, workdir=False)
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    cases = [measure(label, args.reps) for label in args.sizes]
    summary = report_lines(cases)
    report = {
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "load_average": {"start": load_before, "end": os.getloadavg()},
        "machine": {"cpu": stall.cpu_model(), "cores": os.cpu_count()},
        "command": " ".join(["python bench/receive.py", *(argv or sys.argv[1:])]),
        "cases": cases, "summary": summary,
    }  # fmt: skip
    pipeline.write_report(args.out, report, summary)


if __name__ == "__main__":
    main()
