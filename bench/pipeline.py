"""Save to durable and restore, stage by stage, against torch.save, safetensors and DCP.

For each size (``--sizes``, default 256MiB and 1GiB; add 4GiB explicitly) and each state
kind (``weights``: a transformer's parameters; ``adam``: the same size split between
parameters and AdamW's two moments, which the daemon stores lossy, the second moment in the
log domain), in one run and interleaved rep by rep (``--reps``, medians reported):

* baselines on the same local disk: ``torch.save`` + fsync and ``torch.load``;
  safetensors ``save_file`` + fsync and ``load_file``; DCP ``async_save`` (until its
  future is done: DCP fsyncs its files) and ``load``;
* ckptd through a ``ckptd serve`` subprocess (unix socket, shared memory): a base, then
  a delta, then the next delta (a trainer's steady state: a delta after a delta) from
  ``save()`` to DURABLE, a restore of the latest step (the chain's head,
  in the daemon's memory); the same through a second, *before* daemon: the code of
  ``--before DIR`` (a directory holding an older ``ckptd`` package, put first on that
  daemon's ``PYTHONPATH``; see bench/README.md), or without it this code with
  ``--base-compression zstd``; a base and a delta streamed over gRPC;
* once per case: a chain ``--depth`` deltas deep, then the daemon restarted and, rep by
  rep, a restore of that step (read from storage through every delta), of a base (from
  storage) and ``torch.load``; back-to-back delta saves (sustained throughput); with
  ``--before``, the same deep step then restored by a daemon on the before code, on the
  same storage (the format is shared), against its own ``torch.load``;
* once, at the first size (weights): sustained delta throughput per ``--worker-counts``
  (``--encode-workers`` 1 and 2 by default).

Stage times come from the daemon's own timers (``ckptd.daemon.engine.stages``: the
``save durable`` log line, JSON), as busy seconds per stage; restores are timed whole on
the client. Ratios are against the baseline measured in the same rep, since the two cores
are shared: read ratios, not seconds.

Usage::

    python bench/pipeline.py                         # 256MiB,1GiB; 3 reps
    python -m bench.pipeline --sizes 256MiB --reps 3 --depth 4
    python bench/pipeline.py --sizes 4GiB --reps 3 --no-before   # alone: > 19 GB RAM
    python bench/pipeline.py --before /tmp/ckptd-main/pkg   # before/after, same run

Writes ``bench/out/pipeline.json`` and prints a markdown summary with the issue's targets.

At 4GiB this process holds the state, its shared-memory staging segment and a restored copy,
the daemon a head and its receive buffers: a first run (2026-12-05, weights, with another
engineer's jobs on the machine) was killed by the kernel's OOM killer at 23 GB with this
process at 9.0 GB anonymous + 4.9 GB shared memory and the daemon at 9.5 GB RSS (the
staging segment included), so it needs the machine alone and over 19 GB free.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from ckptd.client import Checkpointer
from ckptd.daemon.config import EngineConfig
from safetensors.torch import load_file, save_file

try:
    from . import stall
    from .daemon import PeakRss, memory_bound
    from .options import add_size_options
except ImportError:  # run as a script: python bench/pipeline.py
    import stall  # type: ignore[no-redef]
    from options import add_size_options  # type: ignore[no-redef]

    from daemon import PeakRss, memory_bound  # type: ignore[no-redef]

MiB = 1 << 20
SIZES = {"16MiB": 16 * MiB, "64MiB": 64 * MiB, "256MiB": 256 * MiB, "1GiB": 1024 * MiB,
         "4GiB": 4096 * MiB}
KINDS = ("weights", "adam")
OUT_PATH = Path(__file__).resolve().parent / "out" / "pipeline.json"
# The targets: ckptd over the baseline, at most.
TARGETS = {
    "delta_save_shm": 1.0, "next_delta_save_shm": 1.0, "base_save_shm": 1.5,
    "delta_save_grpc": 1.5, "base_save_grpc": 2.0,
    "restore_latest": 1.0, "restore_base_after_restart": 1.5, "restore_deep": 2.0,
}  # fmt: skip


def make_state(nbytes: int, kind: str) -> dict[str, Any]:
    """A transformer-shaped state of about ``nbytes``: per block a few large matrices and
    many small tensors (norms, biases, per-head scales); ``adam`` adds AdamW's moments in
    ``optimizer.state_dict()`` form, the three together ``nbytes``."""
    params_bytes = nbytes if kind == "weights" else nbytes // 3
    width = 512 if params_bytes <= 64 * MiB else 1024 if params_bytes <= 320 * MiB else 2048
    generator = torch.Generator().manual_seed(0)
    params: dict[str, torch.Tensor] = {}
    total, block = 0, 0
    while total < params_bytes:
        shapes = {"attn.qkv.weight": (3 * width, width), "attn.out.weight": (width, width),
                  "mlp.up.weight": (4 * width, width), "mlp.down.weight": (width, 4 * width),
                  "attn.qkv.bias": (3 * width,), "mlp.up.bias": (4 * width,),
                  "norm1.weight": (width,), "norm1.bias": (width,),
                  "norm2.weight": (width,), "norm2.bias": (width,)}  # fmt: skip
        shapes.update({f"attn.head{h}.scale": (64,) for h in range(16)})
        for name, shape in shapes.items():
            tensor = torch.randn(shape, generator=generator) * 0.02
            params[f"blocks.{block}.{name}"] = tensor
            total += tensor.nbytes
        block += 1
    if kind == "weights":
        return {"model": params}
    state = {
        i: {"step": torch.tensor(100.0), "exp_avg": torch.randn_like(p) * 1e-3,
            "exp_avg_sq": torch.rand_like(p) * 1e-6}
        for i, p in enumerate(params.values())
    }  # fmt: skip
    groups = [{"lr": 1e-3, "params": list(state)}]
    return {"model": params, "optimizer": {"state": state, "param_groups": groups}}


def tensors(state: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a nested state, by dotted path (safetensors wants a flat dict)."""
    if isinstance(state, torch.Tensor):
        return {prefix: state}
    if isinstance(state, dict):
        items: Iterator[tuple[Any, Any]] = iter(state.items())
    elif isinstance(state, list):
        items = iter(enumerate(state))
    else:
        return {}
    flat: dict[str, torch.Tensor] = {}
    for key, value in items:
        flat.update(tensors(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def timed(call: Callable[[], object]) -> float:
    began = time.perf_counter()
    call()
    return time.perf_counter() - began


def fsync_path(path: Path) -> None:
    with path.open("rb+") as handle:
        os.fsync(handle.fileno())


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def baselines(state: dict[str, Any], workdir: Path, record: dict[str, list[float]]) -> None:
    """One rep of every baseline, into ``record`` (seconds)."""
    path = workdir / "state.pt"
    record["torch_save_fsync"].append(timed(lambda: (torch.save(state, path), fsync_path(path))))
    record["torch_load"].append(timed(lambda: torch.load(path, weights_only=True)))
    path.unlink()
    flat = {name: t.contiguous() for name, t in tensors(state).items()}
    path = workdir / "state.safetensors"
    record["safetensors_save_fsync"].append(
        timed(lambda: (save_file(flat, str(path)), fsync_path(path))))
    record["safetensors_load"].append(timed(lambda: load_file(str(path))))
    path.unlink()
    folder = workdir / "dcp"
    record["dcp_async_save"].append(
        timed(lambda: dcp.async_save(state, checkpoint_id=str(folder)).result()))
    target = {name: torch.empty_like(t) for name, t in flat.items()}
    dcp_flat = workdir / "dcp-flat"
    dcp.save(flat, checkpoint_id=str(dcp_flat))
    record["dcp_load"].append(timed(lambda: dcp.load(target, checkpoint_id=str(dcp_flat))))
    shutil.rmtree(folder)
    shutil.rmtree(dcp_flat)


def perturb(state: dict[str, Any]) -> None:
    """A small change of every float tensor, so each save carries a real delta."""
    for tensor in tensors(state).values():
        if tensor.is_floating_point() and tensor.dim() > 0:
            tensor.mul_(1.0001).add_(1e-6)


def durable_s(ckpt: Checkpointer, step: int, state: dict[str, Any]) -> float:
    """``save()`` to DURABLE."""
    began = time.perf_counter()
    ckpt.save(step, state).wait_durable()
    return time.perf_counter() - began


def sustained_MBps(ckpt: Checkpointer, first_step: int, saves: int, state: dict[str, Any]) -> float:
    """Back-to-back saves (each perturbed first), raw MB/s from the first call to the last
    DURABLE."""
    began = time.perf_counter()
    for step in range(first_step, first_step + saves):
        perturb(state)
        ckpt.save(step, state)
    ckpt.wait()
    nbytes = sum(t.nbytes for t in tensors(state).values())
    return saves * nbytes / (time.perf_counter() - began) / 1e6


@contextlib.contextmanager
def serve(
    workdir: Path, budget: int, *flags: str, code: Path | None = None,
    memory: dict[str, int] | None = None,
) -> Iterator[stall.DaemonProcess]:
    """A daemon logging JSON; ``code``: a directory whose ``ckptd`` package it runs.
    ``memory``: its resident bytes are recorded there (``update_memory``)."""
    workdir.mkdir(parents=True, exist_ok=True)
    extra = ("--log-level", "info", "--log-format", "json", *flags)
    saved = os.environ.get("PYTHONPATH")
    if code is not None:
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(code), saved) if p)
    try:
        with stall.daemon(workdir, budget, extra) as proc:
            if memory is None:
                yield proc
                return
            pid = proc.proc.pid
            memory["idle_rss"] = min(memory.get("idle_rss", 1 << 62), status_bytes(pid, "VmRSS"))
            with PeakRss(lambda: status_bytes(pid, "RssAnon"), 0.02) as anon:
                try:
                    yield proc
                finally:
                    update_memory(memory, pid, anon.peak)
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved


def status_bytes(pid: int, field: str) -> int:
    """A size field of ``/proc/PID/status`` (``VmRSS``, ``VmHWM``, ``RssAnon``...) in bytes;
    0 once the process is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    return 0


def update_memory(memory: dict[str, int], pid: int, peak_anon: int) -> None:
    """Folds one daemon's peaks into ``memory``, read before it stops: ``VmHWM`` (the
    kernel's high-water mark of its whole RSS, the client's shared-memory segments it
    mapped included) and the sampled peak of its anonymous RSS (its own memory)."""
    memory["peak_rss"] = max(memory.get("peak_rss", 0), status_bytes(pid, "VmHWM"))
    memory["peak_anon"] = max(memory.get("peak_anon", 0), peak_anon)


def stage_lines(workdir: Path, msg: str = "save durable") -> dict[str, Any]:
    """The daemon's ``msg`` lines by ``run/step`` (saves: kind, stage and total seconds), or
    as lists of lines (``restore served``: prepare and stream seconds of each restore)."""
    found: dict[str, Any] = {}
    for line in (workdir / "daemon.log").read_text().splitlines():
        if not line.startswith("{"):
            continue
        entry = json.loads(line)
        if entry.get("msg") != msg:
            continue
        where = f"{entry['run']}/{entry['step']}"
        if msg == "save durable":
            found[where] = entry
        else:
            found.setdefault(where, []).append(entry)
    return found


def ckptd_rep(addr: str, before_addr: str | None, rep: int, state: dict[str, Any], *,
              kind: str, record: dict[str, list[float]]) -> None:
    """One rep of ckptd: shm base, delta, next delta (the steady state: a delta after a
    delta), restore latest; gRPC base, delta and restore latest; each on this daemon and
    the before one (this client talks to both). The two daemons take turns going first, so
    that each follows the other's gigabytes of writes (and their writeback) equally often.
    Without ``before_addr`` (``--no-before``) only this daemon."""
    sides = ((addr, ""), (before_addr, "_before")) if before_addr else ((addr, ""),)
    if rep % 2:
        sides = sides[::-1]
    for daemon, suffix in sides:
        with Checkpointer(daemon, run=f"{kind}-shm{suffix}-{rep}", transport="shm") as ckpt:
            record[f"base_save_shm{suffix}"].append(durable_s(ckpt, 1, state))
            perturb(state)
            record[f"delta_save_shm{suffix}"].append(durable_s(ckpt, 2, state))
            perturb(state)
            record[f"next_delta_save_shm{suffix}"].append(durable_s(ckpt, 3, state))
            record[f"restore_latest{suffix}"].append(timed(ckpt.restore))
    for daemon, suffix in sides:
        with Checkpointer(daemon, run=f"{kind}-grpc{suffix}-{rep}", transport="grpc") as ckpt:
            record[f"base_save_grpc{suffix}"].append(durable_s(ckpt, 1, state))
            perturb(state)
            record[f"delta_save_grpc{suffix}"].append(durable_s(ckpt, 2, state))
            record[f"restore_latest_grpc{suffix}"].append(timed(ckpt.restore))


def measure_case(label: str, kind: str, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    state = make_state(SIZES[label], kind)
    flat = tensors(state)
    nbytes = sum(t.nbytes for t in flat.values())
    print(f"[{label} {kind}] {len(flat)} tensors, {nbytes / MiB:.0f} MiB", flush=True)
    budget = 2 * nbytes + 64 * MiB
    record: dict[str, list[float]] = {k: [] for k in (
        "torch_save_fsync", "torch_load", "safetensors_save_fsync", "safetensors_load",
        "dcp_async_save", "dcp_load", "base_save_shm", "delta_save_shm", "restore_latest",
        "base_save_shm_before", "delta_save_shm_before", "restore_latest_before",
        "next_delta_save_shm", "next_delta_save_shm_before",
        "base_save_grpc", "delta_save_grpc", "restore_latest_grpc",
        "base_save_grpc_before", "delta_save_grpc_before", "restore_latest_grpc_before",
    )}  # fmt: skip
    main_dir, before_dir = root / f"{label}-{kind}", root / f"{label}-{kind}-before"
    workers = ("--encode-workers", str(args.encode_workers))
    before_flags = tuple(args.before_flags.split()) if args.before_flags else (
        () if args.before else ("--base-compression", "zstd"))
    memory: dict[str, int] = {}
    before_daemon = (contextlib.nullcontext(None) if args.no_before else
                     serve(before_dir, budget, *workers, *before_flags, code=args.before))
    with serve(main_dir, budget, *workers, memory=memory) as main, before_daemon as before:
        for rep in range(args.reps):
            baselines(state, root, record)
            ckptd_rep(main.address, before.address if before else None, rep, state, kind=kind,
                      record=record)
            print(f"[{label} {kind}] rep {rep}: " + ", ".join(
                f"{k} {v[-1]:.2f}" for k, v in record.items() if v), flush=True)
        with Checkpointer(main.address, run=f"{kind}-deep", transport="shm") as ckpt:
            # Step 1 is a base; the burst's back-to-back deltas end the chain ``depth`` deep.
            singles = args.depth + 1 - args.burst
            for step in range(1, singles + 1):
                perturb(state)
                ckpt.save(step, state).wait_durable()
            record["sustained_MBps"] = [sustained_MBps(ckpt, singles + 1, args.burst, state)]
    before_stages = {} if args.no_before else stage_lines(before_dir)
    shutil.rmtree(before_dir, ignore_errors=True)
    deep = {"restore_deep": [], "restore_base_after_restart": [], "torch_load_deep": []}
    path = root / "deep.pt"
    torch.save(state, path)
    deep_step = args.depth + 1  # the chain's latest: ``depth`` deltas deep
    # Restarted: no head in memory.
    with serve(main_dir, budget, *workers, memory=memory) as main, \
            Checkpointer(main.address, run=f"{kind}-deep", transport="shm") as ckpt:
        for _ in range(args.reps):
            deep["torch_load_deep"].append(timed(lambda: torch.load(path, weights_only=True)))
            deep["restore_deep"].append(timed(lambda: ckpt.restore(deep_step)))
            # The base: read from storage each time (only a chain's head stays in memory).
            deep["restore_base_after_restart"].append(timed(lambda: ckpt.restore(1)))
    restores = stage_lines(main_dir, "restore served")
    if args.before:  # the same chain restored by the before code, from the same storage
        deep.update(restore_deep_before=[], torch_load_deep_before=[])
        with serve(main_dir, budget, *workers, code=args.before) as old, \
                Checkpointer(old.address, run=f"{kind}-deep", transport="shm") as ckpt:
            for _ in range(args.reps):
                deep["torch_load_deep_before"].append(
                    timed(lambda: torch.load(path, weights_only=True)))
                deep["restore_deep_before"].append(timed(lambda: ckpt.restore(deep_step)))
        restores["before"] = {key: lines[len(restores.get(key, [])):] for key, lines in
                              stage_lines(main_dir, "restore served").items()}
    path.unlink()
    record.update(deep)
    stages = stage_lines(main_dir)
    shutil.rmtree(main_dir)
    largest = max(t.nbytes for t in flat.values())
    memory["bound"] = stated_bound(memory["idle_rss"], budget, nbytes, largest)
    return {"size": label, "kind": kind, "bytes": nbytes, "tensors": len(flat),
            "seconds": record, "stages": stages, "stages_before": before_stages,
            "restores": restores, "daemon_memory": memory}


def stated_bound(idle_rss: int, budget: int, restore_bytes: int, largest_tensor: int) -> int:
    """README "Memory bound" for the main daemon as run here: its idle RSS, the in-flight
    ``budget``, the default ``max_resident_bytes`` of heads, the restore budget or the
    largest restore if larger, and the workers' encoded blobs (``bench.daemon.memory_bound``)."""
    config = EngineConfig()
    return (memory_bound(idle_rss, budget, config.max_resident_bytes, largest_tensor)
            + max(config.max_restore_bytes, restore_bytes))


def measure_workers(label: str, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """Sustained delta throughput of one daemon per ``--encode-workers`` value."""
    state = make_state(SIZES[label], "weights")
    nbytes = sum(t.nbytes for t in tensors(state).values())
    out: dict[str, Any] = {"size": label, "MBps": {}}
    for workers in args.worker_counts:
        folder = root / f"workers-{workers}"
        flags = ("--encode-workers", str(workers))
        with serve(folder, 2 * nbytes + 64 * MiB, *flags) as proc, \
                Checkpointer(proc.address, run="workers", transport="shm") as ckpt:
            ckpt.save(1, state).wait_durable()
            out["MBps"][str(workers)] = sustained_MBps(ckpt, 2, args.burst, state)
        shutil.rmtree(folder)
        print(f"[{label}] encode-workers {workers}: {out['MBps'][str(workers)]:.0f} MB/s",
              flush=True)
    return out


def ratios(case: dict[str, Any]) -> dict[str, float]:
    """ckptd over its baseline, medians of the same run (lower is better)."""
    s = {k: median(v) for k, v in case["seconds"].items()}
    save, load = s["torch_save_fsync"], s["torch_load"]
    torch_MBps = case["bytes"] / save / 1e6
    return {
        "base_save_shm": s["base_save_shm"] / save,
        "base_save_shm_before": s["base_save_shm_before"] / save,
        "delta_save_shm": s["delta_save_shm"] / save,
        "delta_save_shm_before": s["delta_save_shm_before"] / save,
        "next_delta_save_shm": s["next_delta_save_shm"] / save,
        "next_delta_save_shm_before": s["next_delta_save_shm_before"] / save,
        "base_save_grpc": s["base_save_grpc"] / save,
        "base_save_grpc_before": s["base_save_grpc_before"] / save,
        "delta_save_grpc": s["delta_save_grpc"] / save,
        "delta_save_grpc_before": s["delta_save_grpc_before"] / save,
        "restore_latest": s["restore_latest"] / load,
        "restore_latest_before": s["restore_latest_before"] / load,
        "restore_latest_grpc": s["restore_latest_grpc"] / load,
        "restore_latest_grpc_before": s["restore_latest_grpc_before"] / load,
        "restore_base_after_restart": s["restore_base_after_restart"] / s["torch_load_deep"],
        "restore_deep": s["restore_deep"] / s["torch_load_deep"],
        "restore_deep_before": (s["restore_deep_before"] / s["torch_load_deep_before"]
                                if "restore_deep_before" in s else float("nan")),
        "sustained_over_torch_save": s["sustained_MBps"] / torch_MBps,
        "safetensors_save_fsync": s["safetensors_save_fsync"] / save,
        "dcp_async_save": s["dcp_async_save"] / save,
        "safetensors_load": s["safetensors_load"] / load,
        "dcp_load": s["dcp_load"] / load,
    }


def stage_summary(case: dict[str, Any], run_prefix: str, step: int) -> dict[str, float]:
    """Median busy seconds per stage of the saves of runs ``{kind}-{run_prefix}-*`` at
    ``step``, plus their ``latency_s`` (accepted → durable)."""
    lines = [v for k, v in case["stages"].items()
             if k.startswith(f"{case['kind']}-{run_prefix}-") and k.endswith(f"/{step}")]
    keys = [k for k in (lines[0] if lines else {}) if k.endswith("_s")]
    return {k: median([float(line[k]) for line in lines]) for k in keys}


def report_lines(cases: list[dict[str, Any]], workers: list[dict[str, Any]]) -> list[str]:
    out = ["| size | state | base shm | (before) | delta shm | (before) | next delta shm "
           "| (before) | base grpc | (before) "
           "| delta grpc | (before) | restore latest | (before) | restore grpc | (before) "
           "| base after restart | deep | (before) "
           "| sustained | safetensors save | DCP async_save | torch.save+fsync s "
           "| torch.load s |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
           "---|---|---|---|"]
    for case in cases:
        r, s = ratios(case), case["seconds"]
        out.append(
            f"| {case['size']} | {case['kind']} | {r['base_save_shm']:.2f} "
            f"| {r['base_save_shm_before']:.2f} | {r['delta_save_shm']:.2f} "
            f"| {r['delta_save_shm_before']:.2f} | {r['next_delta_save_shm']:.2f} "
            f"| {r['next_delta_save_shm_before']:.2f} "
            f"| {r['base_save_grpc']:.2f} | {r['base_save_grpc_before']:.2f} "
            f"| {r['delta_save_grpc']:.2f} | {r['delta_save_grpc_before']:.2f} "
            f"| {r['restore_latest']:.2f} | {r['restore_latest_before']:.2f} "
            f"| {r['restore_latest_grpc']:.2f} | {r['restore_latest_grpc_before']:.2f} "
            f"| {r['restore_base_after_restart']:.2f} "
            f"| {r['restore_deep']:.2f} | {r['restore_deep_before']:.2f} "
            f"| {r['sustained_over_torch_save']:.2f} "
            f"| {r['safetensors_save_fsync']:.2f} | {r['dcp_async_save']:.2f} "
            f"| {median(s['torch_save_fsync']):.2f} | {median(s['torch_load']):.2f} |")
    out += ["", "Stages (daemon busy seconds, median; over shm unless it says gRPC):", "",
            "| size | state | save | " + " | ".join(STAGE_KEYS) + " |",
            "|---|---|---|" + "---|" * len(STAGE_KEYS)]
    for case in cases:
        for what, prefix, step in (("base", "shm", 1), ("delta", "shm", 2),
                                   ("next delta", "shm", 3), ("base grpc", "grpc", 1),
                                   ("delta grpc", "grpc", 2)):
            st = stage_summary(case, prefix, step)
            cells = " | ".join(f"{st.get(k, float('nan')):.2f}" for k in STAGE_KEYS)
            out.append(f"| {case['size']} | {case['kind']} | {what} | {cells} |")
    out += usage_lines(cases) + memory_lines(cases)
    out += ["", "Restores (daemon seconds, median: prepare = budget, copy or decode, verify; "
            "stream = header and chunks until the client took the last):", "",
            "| size | state | restore | prepare s | stream s |", "|---|---|---|---|---|"]
    for case in cases:
        for what, (prefix, step) in (("latest (head)", ("shm", 3)),
                                     ("latest over gRPC", ("grpc", 2)),
                                     ("deep, from storage", ("deep", None)),
                                     ("(before) deep", ("deep-before", None))):
            lines = restore_lines(case, prefix, step)
            if not lines:
                continue
            prepare = median([float(line["prepare_s"]) for line in lines])
            stream = median([float(line["stream_s"]) for line in lines])
            out.append(f"| {case['size']} | {case['kind']} | {what} | {prepare:.2f} "
                       f"| {stream:.2f} |")
    for entry in workers:
        rates = ", ".join(f"{w} worker(s) {v:.0f} MB/s" for w, v in entry["MBps"].items())
        out.append(f"\nSustained delta saves at {entry['size']}: {rates}.")
    out += ["", "Targets (ckptd over baseline, median of the same run):"]
    for case in cases:
        r = ratios(case)
        verdicts = [f"{name} {r[name]:.2f} (<= {limit}: {'PASS' if r[name] <= limit else 'FAIL'})"
                    for name, limit in TARGETS.items()]
        sustained = r["sustained_over_torch_save"]
        verdicts.append(f"sustained {sustained:.2f}x torch.save+fsync's rate "
                        f"(>= 1: {'PASS' if sustained >= 1 else 'FAIL'})")
        out.append(f"- {case['size']} {case['kind']}: " + "; ".join(verdicts))
    return out


def usage_lines(cases: list[dict[str, Any]]) -> list[str]:
    """What each delta over shm used, from its ``save durable`` line: the share of its raw
    bytes received into buffers mapped already (reused or prepared after a base), the share
    reconstructed into a replaced head's memory, and how many reps were streamed."""
    out = ["", "What the deltas used (per save line; ready = received into mapped buffers, "
           "recycled = reconstructed into a replaced head, share of raw bytes):", "",
           "| size | state | save | ready (each rep) | recycled (each rep) | streamed |",
           "|---|---|---|---|---|---|"]
    for case in cases:
        for what, step in (("delta", 2), ("next delta", 3)):
            lines = [v for k, v in sorted(case["stages"].items())
                     if k.startswith(f"{case['kind']}-shm-") and k.endswith(f"/{step}")]
            if not lines or "ready_bytes" not in lines[0]:
                continue
            ready = ", ".join(_share(line, "ready_bytes") for line in lines)
            used = ", ".join(_share(line, "recycled_bytes") for line in lines)
            streamed = sum(bool(line.get("streamed")) for line in lines)
            out.append(f"| {case['size']} | {case['kind']} | {what} | {ready} | {used} "
                       f"| {streamed} of {len(lines)} |")
    return out


def memory_lines(cases: list[dict[str, Any]]) -> list[str]:
    """The main daemon's resident memory per case against the README's stated bound."""
    out = ["", "The daemon's memory (main daemon, both of its runs; MiB; peak RSS = VmHWM, with "
           "the clients' shared-memory segments it mapped; anon = its own memory, sampled "
           "every 20 ms):", "",
           "| size | state | idle RSS | peak RSS | peak anon | stated bound | within |",
           "|---|---|---|---|---|---|---|"]
    for case in cases:
        mem = case.get("daemon_memory")
        if not mem:
            continue
        mib = {k: v / MiB for k, v in mem.items()}
        within = "yes" if mem["peak_rss"] <= mem["bound"] else "NO"
        out.append(f"| {case['size']} | {case['kind']} | {mib['idle_rss']:.0f} "
                   f"| {mib['peak_rss']:.0f} | {mib['peak_anon']:.0f} | {mib['bound']:.0f} "
                   f"| {within} |")
    return out


def _share(line: dict[str, Any], field: str) -> str:
    return f"{int(line[field]) / max(1, int(line['raw_bytes'])):.2f}"


def restore_lines(case: dict[str, Any], prefix: str, step: int | None) -> list[dict[str, Any]]:
    """``restore served`` lines of runs ``{kind}-{prefix}-*`` at ``step`` (``deep``: the
    deep run's latest step)."""
    if prefix in ("deep", "deep-before"):
        restores = case.get("restores", {})
        latest = max(int(k.rsplit("/", 1)[1]) for k in restores
                     if k.startswith(f"{case['kind']}-deep/"))
        found = restores.get("before", {}) if prefix == "deep-before" else restores
        return list(found.get(f"{case['kind']}-deep/{latest}", []))
    return [line for k, lines in case.get("restores", {}).items()
            if k.startswith(f"{case['kind']}-{prefix}-") and k.endswith(f"/{step}")
            for line in lines]


STAGE_KEYS = ("latency_s", "receive_s", "head_s", "encode_exact_s", "encode_delta_s",
              "blob_checksum_s", "write_s", "sync_s", "checksum_s", "commit_s")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_size_options(parser, sizes="256MiB,1GiB", reps=3, out=OUT_PATH, before="optional",
                     reps_help="interleaved repetitions (>= 3)")
    parser.add_argument("--kinds", default=",".join(KINDS), help="comma list of weights, adam")
    parser.add_argument("--depth", type=int, default=10, help="deltas of the deep restore")
    parser.add_argument("--burst", type=int, default=3, help="back-to-back saves (sustained)")
    parser.add_argument("--encode-workers", type=int, default=2, help="of the main daemons")
    parser.add_argument("--worker-counts", default="1,2",
                        help="encode workers compared for sustained throughput (empty: skip)")
    parser.add_argument("--no-before", action="store_true",
                        help="run no second daemon (its columns stay empty): for 4GiB, "
                             "whose two daemons would not fit in 24 GB")
    parser.add_argument("--before-flags", default="",
                        help="daemon flags of the before daemon (e.g. the same code as "
                             "--before with '--stream-saves never')")
    args = parser.parse_args(argv)
    args.kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    args.worker_counts = [int(w) for w in args.worker_counts.split(",") if w.strip()]
    if not 1 <= args.burst <= args.depth:
        parser.error(f"--burst {args.burst} must be in 1..--depth ({args.depth})")
    unknown = [s for s in args.sizes if s not in SIZES] + [k for k in args.kinds if k not in KINDS]
    if unknown:
        parser.error(f"unknown {unknown}; sizes {list(SIZES)}, kinds {list(KINDS)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cases, workers = [], []
    with tempfile.TemporaryDirectory(prefix="ckptd-pipeline-", dir=args.workdir) as tmp:
        root = Path(tmp)
        for label in args.sizes:
            for kind in args.kinds:
                cases.append(measure_case(label, kind, args, root))
            if args.worker_counts and label == args.sizes[0]:  # the smallest: time is short
                workers.append(measure_workers(label, args, root))
    summary = report_lines(cases, workers)
    report = {
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "load_average": os.getloadavg(),
        "machine": {"cpu": stall.cpu_model(), "cores": os.cpu_count(),
                    "python": platform.python_version(), "torch": torch.__version__},
        "command": " ".join(["python bench/pipeline.py", *(argv or sys.argv[1:])]),
        "cases": cases, "workers": workers, "ratios": [ratios(c) for c in cases],
        "summary": summary,
    }  # fmt: skip
    write_report(args.out, report, summary)


def write_report(out: Path, report: dict[str, Any], summary: list[str]) -> None:
    """Writes ``report`` as JSON to ``out`` and prints its markdown ``summary``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print("\n".join(summary))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
