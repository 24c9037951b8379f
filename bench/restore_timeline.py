"""Where one shared-memory restore's time goes, client side: a timeline per restore.

``bench/restore.py`` times whole restores; this one follows a single restore on the client
through its ``segment_ready`` batches (the daemon writes batch i+1 while the client copies
batch i) and says, per restore: when the header came, when the first and the last batch
were announced, how long the client spent copying (and hashing) announced batches, how long
it sat waiting for the next announcement, and what came after the last copy (mapping
dropped, segment closed, structure rebuilt, tensors dropped); plus the CPU seconds of the
client and of the daemon. Cases: ``latest`` (the chain's head, copied; the client's second
thread, ``client/sidecar.py``, faults the fresh tensors in ahead of the copy),
``latest_huge`` (the same with each fresh tensor advised ``MADV_HUGEPAGE`` first:
transparent huge pages, tried and not kept), ``latest_inline`` (the client before the
second thread: each fresh tensor faulted in on the copying thread as it is allocated),
``views``
(the same, ``zero_copy=True``), ``base`` (step 1 from storage). One daemon, this code; the state
is ``pipeline.make_state(size, "weights")``, saved as a base and one delta. Usage::

    python bench/restore_timeline.py --sizes 256MiB --reps 5

Writes ``bench/out/restore_timeline.json`` and prints a markdown table of medians, with
``torch.load`` of the same state from a file in the page cache for scale. It wraps the
client's private ``streams._announced`` to see the batches: a measuring tool, not an API.
"""

from __future__ import annotations

import argparse
import ctypes
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from ckptd.client import Checkpointer
from ckptd.client import restore as client_restore
from ckptd.client.pages import PagePopulator
from ckptd.client.sidecar import RestoreSidecar
from ckptd.protos import streams

try:
    from . import pipeline
    from .options import add_size_options
    from .restore import daemon_cpu_s, run_sizes, save_chain
except ImportError:  # run as a script: python bench/restore_timeline.py
    import pipeline  # type: ignore[no-redef]
    from options import add_size_options  # type: ignore[no-redef]
    from restore import daemon_cpu_s, run_sizes, save_chain  # type: ignore[no-redef]

OUT_PATH = Path(__file__).resolve().parent / "out" / "restore_timeline.json"
FIELDS = ("total_s", "header_s", "first_ready_s", "last_ready_s", "client_copy_s",
          "client_wait_s", "after_last_s", "client_cpu_s", "daemon_cpu_s")


class Timeline:
    """Marks of one restore: its start, the header, each batch announced and copied."""

    def __init__(self) -> None:
        self.marks: list[tuple[str, float]] = []

    def mark(self, what: str) -> None:
        self.marks.append((what, time.perf_counter()))

    def wrap(self, announced: Callable[..., Iterator[range]]) -> Callable[..., Iterator[range]]:
        def timed(header: Any, replies: Any) -> Iterator[range]:
            self.mark("header")
            for batch in announced(header, replies):
                self.mark("ready")
                yield batch  # the caller copies (or hashes) the batch before asking again
                self.mark("copied")
        return timed

    def summary(self) -> dict[str, float]:
        start = self.marks[0][1]
        at = {what: [t - start for w, t in self.marks if w == what]
              for what in ("header", "ready", "copied", "end")}
        ready, copied = at["ready"], at["copied"]
        return {
            "total_s": at["end"][0], "header_s": at["header"][0],
            "first_ready_s": ready[0], "last_ready_s": ready[-1],
            "client_copy_s": sum(c - r for r, c in zip(ready, copied, strict=True)),
            "client_wait_s": sum(r - c for r, c in zip(ready[1:], copied, strict=False)),
            "after_last_s": at["end"][0] - copied[-1],
        }


HUGE_PAGE_BYTES = 2 << 20
_MADV_HUGEPAGE = 14  # linux/mman.h


class HugeSidecar(RestoreSidecar):
    """The client with each fresh tensor's whole 2 MiB pages advised ``MADV_HUGEPAGE``
    before its helper populates them: with transparent huge pages in ``madvise`` mode they
    fault in as 2 MiB pages (fewer faults and page-table entries; direct compaction where
    no free huge page is at hand). Tried for the client, not kept (bench/README.md)."""

    def __init__(self) -> None:
        super().__init__()
        self._madvise = ctypes.CDLL(None, use_errno=True).madvise
        self._madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]

    def add(self, tensor: torch.Tensor) -> None:
        address, nbytes = tensor.data_ptr(), tensor.numel() * tensor.element_size()
        start = -(-address // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES
        end = (address + nbytes) // HUGE_PAGE_BYTES * HUGE_PAGE_BYTES
        if end > start:
            self._madvise(start, end - start, _MADV_HUGEPAGE)
        super().add(tensor)


class InlineSidecar(RestoreSidecar):
    """The client before its second thread: each fresh tensor faulted in on the copying
    thread as it is allocated."""

    def __init__(self) -> None:
        super().__init__()
        self._inline = PagePopulator()

    def add(self, tensor: torch.Tensor) -> None:
        self._inline.populate(tensor)


def on(sidecar: type[RestoreSidecar], call: Callable[[], object]) -> Callable[[], object]:
    """``call`` with the client's restores on ``sidecar``."""
    def run() -> object:
        client_restore.RestoreSidecar = sidecar  # type: ignore[misc]
        try:
            return call()
        finally:
            client_restore.RestoreSidecar = RestoreSidecar  # type: ignore[misc]
    return run


def measure(label: str, reps: int, root: Path) -> dict[str, Any]:
    state = pipeline.make_state(pipeline.SIZES[label], "weights")
    nbytes = sum(t.nbytes for t in pipeline.tensors(state).values())
    timeline = Timeline()
    real = streams._announced
    streams._announced = timeline.wrap(real)  # type: ignore[assignment]
    record: dict[str, list[dict[str, float]]] = {
        "latest": [], "latest_huge": [], "latest_inline": [], "views": [], "base": []}
    loads: list[float] = []
    try:
        with pipeline.serve(root / label, 2 * nbytes + 64 * pipeline.MiB) as daemon:
            save_chain(daemon.address, state)
            torch.save(state, root / "state.pt")
            del state
            with Checkpointer(daemon.address, run="r", transport="shm") as ckpt:
                cases: dict[str, Callable[[], object]] = {
                    "latest": ckpt.restore, "latest_huge": on(HugeSidecar, ckpt.restore),
                    "latest_inline": on(InlineSidecar, ckpt.restore),
                    "views": lambda: ckpt.restore(zero_copy=True),
                    "base": lambda: ckpt.restore(1)}
                for rep in range(reps):
                    loads.append(pipeline.timed(
                        lambda: torch.load(root / "state.pt", weights_only=True)))
                    for case, call in cases.items():
                        record[case].append(one(timeline, call, daemon.proc.pid))
                    print(f"[{label}] rep {rep}: torch_load {loads[-1]:.3f}, " + ", ".join(
                        f"{c} {v[-1]['total_s']:.3f}" for c, v in record.items()), flush=True)
    finally:
        streams._announced = real  # type: ignore[assignment]
        (root / "state.pt").unlink(missing_ok=True)
    return {"size": label, "bytes": nbytes, "torch_load_s": loads, "restores": record}


def one(timeline: Timeline, call: Callable[[], object], daemon_pid: int) -> dict[str, float]:
    """Runs one restore (its result dropped inside, as torch.load's is) under ``timeline``."""
    timeline.marks.clear()
    daemon, client = daemon_cpu_s(daemon_pid), time.process_time()
    timeline.mark("start")
    call()
    timeline.mark("end")
    return {**timeline.summary(), "client_cpu_s": time.process_time() - client,
            "daemon_cpu_s": daemon_cpu_s(daemon_pid) - daemon}


def summary(cases: list[dict[str, Any]]) -> list[str]:
    lines = ["| size | restore | torch.load s | " + " | ".join(FIELDS) + " |",
             "|---|---|---|" + "---|" * len(FIELDS)]
    for case in cases:
        load = pipeline.median(case["torch_load_s"])
        for name, reps in case["restores"].items():
            cells = " | ".join(f"{pipeline.median([r[f] for r in reps]):.3f}" for f in FIELDS)
            lines.append(f"| {case['size']} | {name} | {load:.3f} | {cells} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_size_options(parser, sizes="256MiB", reps=5, out=OUT_PATH,
                     reps_help="repetitions (medians reported)")
    args = parser.parse_args(argv)
    run_sizes("python bench/restore_timeline.py", args, argv,
              lambda label, root: measure(label, args.reps, root), summary)

if __name__ == "__main__":
    main()
