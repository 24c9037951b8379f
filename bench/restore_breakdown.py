"""Where a restore from storage spends the daemon's time: a base, and a step deep in a chain.

``bench/pipeline.py`` times a restore of a base after a restart and of a step ``--depth``
deltas deep end to end, client included. This benchmark looks inside the daemon's half.
Per size it saves a transformer-shaped state (``pipeline.make_state``) through a real
``ckptd serve`` (a base, then ``--depth`` deltas, each after ``pipeline.perturb``), stops
it, then, in this process, opens the same storage with the daemon's own ``Repository``
and pools (``--encode-workers`` codec threads, ``--storage-workers`` I/O threads, as the
daemon's defaults) and streams each step, rep by rep, the way the servicer does for a
restore into shared memory: each array ``pwritev``'d into a fresh tmpfs file at its
aligned offset (``shm.write_tensors``) before the next is asked for.

Each stage is timed where it runs (busy seconds, summed over threads, like the save's
``StageTimes``): ``read`` (``Storage.read_into``), ``blob_hash`` (each blob's xxh3_64
against its manifest), ``apply`` (``_apply``: the base's raw view or decode, and the
chain's ``apply_deltas``), ``fold`` (the step's xxh3_128, in table order), ``write`` (the
``pwritev`` into the segment), and ``wait``: the consumer waiting for the next tensor
to be ready (the pipeline's idle time as the writer sees it); ``<stage>_cpu`` is the CPU
time of the thread that ran each stage (not of threads it starts). ``cpu_s`` is this
process's CPU seconds over the restore, ``wall_s`` its wall seconds; the summary's
``other_cpu`` is ``cpu_s`` less the stages' own CPU: mostly the decode's chunk threads.
Besides, ``torch.load`` of the same state from a file in the page cache (the pipeline's
baseline) is timed each rep.

Usage::

    python bench/restore_breakdown.py --sizes 256MiB --reps 3
    flock /work/bench-1g.lock python bench/restore_breakdown.py --sizes 1GiB --reps 3

Writes ``bench/out/restore_breakdown.json`` and prints a markdown table (medians).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import platform
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
from ckptd.client import Checkpointer
from ckptd.daemon.codec import kernels
from ckptd.daemon.domain import StepKey
from ckptd.daemon.pools import Pools
from ckptd.daemon.storage.local import LocalStorage
from ckptd.daemon.store import restore as restore_mod
from ckptd.daemon.store.repository import Repository
from ckptd.protos import segments
from ckptd.protos.checksum import TensorsChecksum

try:
    from . import pipeline
    from .options import add_size_options
except ImportError:  # run as a script: python bench/restore_breakdown.py
    import pipeline  # type: ignore[no-redef]
    from options import add_size_options  # type: ignore[no-redef]

T = TypeVar("T")
OUT_PATH = Path(__file__).resolve().parent / "out" / "restore_breakdown.json"
STAGES = ("read", "blob_hash", "apply", "fold", "write", "wait")


class Busy:
    """Busy seconds per stage, summed over the threads that ran it."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(STAGES, 0.0)
        self.seconds.update(dict.fromkeys((f"{s}_cpu" for s in STAGES[:-1]), 0.0))
        self._lock = threading.Lock()

    def add(self, stage: str, seconds: float, cpu_s: float | None = None) -> None:
        with self._lock:
            self.seconds[stage] += seconds
            if cpu_s is not None:
                self.seconds[f"{stage}_cpu"] += cpu_s

    def wrap(self, stage: str, call: Callable[..., T]) -> Callable[..., T]:
        """``call`` timed: wall, and CPU of the calling thread (not of threads it starts:
        ``apply``'s chunk threads are in ``cpu_s`` only)."""
        @functools.wraps(call)
        def timed(*args: Any, **kwargs: Any) -> T:
            began, cpu = time.perf_counter(), time.thread_time()
            try:
                return call(*args, **kwargs)
            finally:
                self.add(stage, time.perf_counter() - began, time.thread_time() - cpu)

        return timed


@contextlib.contextmanager
def instrumented(busy: Busy, storage: LocalStorage) -> Iterator[None]:
    """Times the restore's stages by wrapping the functions it calls (this process only)."""
    patched = {name: getattr(restore_mod, name) for name in ("_check_blob", "_apply", "_fold")}
    read_into = storage.read_into
    try:
        restore_mod._check_blob = busy.wrap("blob_hash", patched["_check_blob"])
        restore_mod._apply = busy.wrap("apply", patched["_apply"])
        restore_mod._fold = busy.wrap("fold", patched["_fold"])
        storage.read_into = busy.wrap("read", read_into)  # type: ignore[method-assign]
        yield
    finally:
        for name, call in patched.items():
            setattr(restore_mod, name, call)
        del storage.read_into


def build_chain(workdir: Path, state: dict[str, Any], depth: int) -> None:
    """Step 1 a base, steps 2..depth+1 deltas, saved through a real daemon."""
    budget = 2 * sum(t.nbytes for t in pipeline.tensors(state).values()) + 64 * pipeline.MiB
    with pipeline.serve(workdir, budget) as daemon, \
            Checkpointer(daemon.address, run="r", transport="shm") as ckpt:
        for step in range(1, depth + 2):
            ckpt.save(step, state).wait_durable()
            pipeline.perturb(state)


async def stream_once(repository: Repository, step: int, busy: Busy, shm_dir: Path) -> None:
    """One restore of ``step`` as the servicer streams it into a segment."""
    key = StepKey("r", 0, step)
    manifest = repository.entry(key).manifest
    sizes = [spec.nbytes for spec in manifest.specs]
    offsets, total = segments.aligned_offsets(sizes)
    checksum = TensorsChecksum()
    loop = asyncio.get_running_loop()
    fd, name = tempfile.mkstemp(dir=shm_dir, prefix="ckptd-breakdown-")
    try:
        os.ftruncate(fd, total)
        write = busy.wrap("write", lambda raw, at: os.pwritev(fd, [raw], at))
        arrays = aiter(repository.stream(key, checksum))
        index = 0
        while True:
            began = time.perf_counter()
            try:
                array = await anext(arrays)
            except StopAsyncIteration:
                break
            busy.add("wait", time.perf_counter() - began)
            raw = array.reshape(-1).view("uint8").data
            await loop.run_in_executor(None, write, raw, offsets[index])
            index += 1
        if checksum.hexdigest() != manifest.checksum:
            raise RuntimeError(f"step {step} restored to a wrong checksum")
    finally:
        os.close(fd)
        os.unlink(name)


async def measure_restores(store: Path, steps: dict[str, int], reps: int, path: Path,
                           args: argparse.Namespace) -> dict[str, list[dict[str, float]]]:
    storage = LocalStorage(store)
    pools = Pools(args.encode_workers, args.storage_workers)
    repository = Repository(storage, pools)
    await repository.load()
    kernels.warm_up()  # as the daemon does at start
    found: dict[str, list[dict[str, float]]] = {name: [] for name in (*steps, "torch_load")}
    shm_dir = Path("/dev/shm")
    try:
        for _ in range(reps):
            began = time.perf_counter()
            torch.load(path, weights_only=True)
            found["torch_load"].append({"wall_s": time.perf_counter() - began})
            for name, step in steps.items():
                busy = Busy()
                cpu, began = time.process_time(), time.perf_counter()
                with instrumented(busy, storage):
                    await stream_once(repository, step, busy, shm_dir)
                found[name].append({"wall_s": time.perf_counter() - began,
                                    "cpu_s": time.process_time() - cpu, **busy.seconds})
    finally:
        await pools.shutdown()
        storage.close()
    return found


def measure(label: str, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    state = pipeline.make_state(pipeline.SIZES[label], "weights")
    workdir = (args.chains or root) / f"{label}-depth{args.depth}"
    if not (args.chains and (workdir / "store").is_dir()):
        build_chain(workdir, state, args.depth)
    path = root / "state.pt"
    torch.save(state, path)
    del state
    steps = {"base": 1, "deep": args.depth + 1}
    try:
        found = asyncio.run(measure_restores(workdir / "store", steps, args.reps, path, args))
    finally:
        path.unlink()
    return {"size": label, "depth": args.depth, "reps": found}


SUMMARY = ("wall_s", "cpu_s", "read_cpu", "blob_hash_cpu", "fold_cpu", "write_cpu",
           "other_cpu", "wait")


def summary(cases: list[dict[str, Any]]) -> list[str]:
    """Medians; ``other_cpu``: the process's CPU besides the timed stages' own threads,
    i.e. mostly the decode's (``apply``'s chunk threads), and the event loop."""
    lines = ["| size | restore | torch.load s | " + " | ".join(SUMMARY) + " | wall / torch.load |",
             "|---|---|---|" + "---|" * len(SUMMARY) + "---|"]
    for case in cases:
        reps = case["reps"]
        load = statistics.median(r["wall_s"] for r in reps["torch_load"])
        for name in ("base", "deep"):
            rows = [{**r, "other_cpu": r["cpu_s"] - sum(r[c] for c in SUMMARY[2:6])}
                    for r in reps[name]]
            medians = {c: statistics.median(r[c] for r in rows) for c in SUMMARY}
            lines.append(f"| {case['size']} | {name} | {load:.3f} | "
                         + " | ".join(f"{medians[c]:.3f}" for c in SUMMARY)
                         + f" | {medians['wall_s'] / load:.2f} |")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_size_options(parser, sizes="256MiB", reps=3, out=OUT_PATH)
    parser.add_argument("--depth", type=int, default=10, help="deltas of the deep step")
    parser.add_argument("--encode-workers", type=int, default=2)
    parser.add_argument("--storage-workers", type=int, default=4)
    parser.add_argument("--chains", type=Path, default=None,
                        help="keep the saved chains here and reuse them on the next run")
    args = parser.parse_args(argv)
    cases = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        for label in args.sizes:
            cases.append(measure(label, args, Path(tmp)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "loadavg": os.getloadavg()}, "cases": cases}
    args.out.write_text(json.dumps(result, indent=1))
    print("\n".join(summary(cases)))


if __name__ == "__main__":
    main()
