"""How long does ``Checkpointer.save`` stall the training loop?

For each state size (float32 tensors shaped like transformer blocks) this measures, in the
same process and run:

* **floor** — a bare ``copy_`` of every tensor into buffers allocated beforehand: the
  least any snapshotting checkpointer can stall (the trainer may mutate right after);
* **torch.save** to a file in a temporary directory on local disk (into the page cache,
  as trainers usually do), and torch.save followed by ``fsync`` (actually on disk);
* **ckptd save()** over each transport (shared memory and gRPC streaming) against a
  daemon subprocess: the stall (time inside ``save``), time to ACCEPTED and to DURABLE,
  and the sustained throughput of back-to-back saves until all are durable;
* **in a training loop** (``stall_loop.py``), for ``snapshot="copy"`` and ``"overlap"``:
  how long ckptd holds the trainer per checkpoint (inside ``save`` plus the optimizer
  step's wait for the background copy) and how much longer that iteration took.

Between timed saves the loop waits until the previous one is durable, as a trainer's
compute between checkpoints would; tensors are scaled slightly before each save so the
daemon encodes real deltas. The first save of each transport allocates its staging buffer
and is reported separately (``first_stall_s``); stalls are medians of the warm saves.

With ``--device cuda`` the state lives on the GPU: the floor is then a copy of every
tensor into page-locked host buffers allocated beforehand (device to host, synchronized),
which is also what ``save()`` does before it returns.

Usage::

    python bench/stall.py                      # 10MB,100MB,1GB; shm and grpc
    python bench/stall.py --sizes 10MB,100MB --reps 3 --transports shm --loop-kinds idle
    python bench/stall.py --device cuda --loop-kinds "" --out bench/out/stall-cuda.json

Writes ``bench/out/stall.json`` and prints a summary table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from ckptd.client import Checkpointer

try:
    from . import stall_loop
except ImportError:  # run as a script: python bench/stall.py
    import stall_loop  # type: ignore[no-redef]

MB = 1_000_000
OUT_PATH = Path(__file__).resolve().parent / "out" / "stall.json"
SIZES = {"10MB": 10 * MB, "100MB": 100 * MB, "1GB": 1000 * MB}
TARGET_STALL_OVER_FLOOR = 1.5
TARGET_TORCH_SAVE_OVER_STALL = 10.0


def make_state(nbytes: int, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Float32 tensors shaped like transformer blocks (attention and MLP matrices, norms,
    biases) adding up to about ``nbytes``, on ``device``."""
    width = 256 if nbytes <= 20 * MB else 1024 if nbytes <= 200 * MB else 2048
    shapes = {
        "attn.qkv.weight": (3 * width, width),
        "attn.qkv.bias": (3 * width,),
        "attn.out.weight": (width, width),
        "norm1.weight": (width,),
        "mlp.up.weight": (4 * width, width),
        "mlp.up.bias": (4 * width,),
        "mlp.down.weight": (width, 4 * width),
        "norm2.weight": (width,),
    }
    generator = torch.Generator().manual_seed(0)
    state: dict[str, torch.Tensor] = {}
    total, block = 0, 0
    while total < nbytes:
        for name, shape in shapes.items():
            tensor = (torch.randn(shape, generator=generator) * 0.02).to(device)
            state[f"blocks.{block}.{name}"] = tensor
            total += tensor.nbytes
        block += 1
    return state


def state_bytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.nbytes for t in state.values())


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


class Clock:
    """Wall and CPU time (all threads of this process) of one timed section."""

    def __enter__(self) -> Clock:
        self.wall_s = self.cpu_s = 0.0
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.wall_s = time.perf_counter() - self._wall
        self.cpu_s = time.process_time() - self._cpu


def bare_copy(state: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> Clock:
    """The floor: copy every tensor into buffers allocated beforehand (from a GPU: into
    page-locked host memory, asynchronously, then wait for the copies)."""
    with Clock() as clock:
        for name, tensor in state.items():
            targets[name].copy_(tensor, non_blocking=tensor.is_cuda)
        if any(tensor.is_cuda for tensor in state.values()):
            torch.cuda.synchronize()
    return clock


def floor_targets(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Destination buffers of the floor copy: host memory (page-locked for GPU tensors)."""
    return {
        name: torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_cuda)
        for name, t in state.items()
    }


def time_torch_save(state: dict[str, torch.Tensor], reps: int, workdir: Path) -> dict[str, Any]:
    path = workdir / "state.pt"
    plain, cpu, synced = [], [], []
    for _ in range(reps):
        with Clock() as clock:
            torch.save(state, path)
        plain.append(clock.wall_s)
        cpu.append(clock.cpu_s)
        began = time.perf_counter()
        with path.open("rb+") as handle:
            os.fsync(handle.fileno())
        synced.append(clock.wall_s + time.perf_counter() - began)
        path.unlink()
    return {"save_s": plain, "save_cpu_s": cpu, "save_fsync_s": synced}


@dataclass
class DaemonProcess:
    proc: subprocess.Popen[bytes]
    address: str

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)


@contextlib.contextmanager
def daemon(
    workdir: Path, max_inflight_bytes: int, extra: tuple[str, ...] = ("--log-level", "warning")
) -> Iterator[DaemonProcess]:
    """A ``ckptd serve`` subprocess on a unix socket, storing under ``workdir`` (a second
    one on the same ``workdir`` restarts on the same storage, appending to its log);
    ``extra`` are more ``serve`` flags."""
    ready = workdir / "ready.json"
    ready.unlink(missing_ok=True)
    command = [
        sys.executable, "-m", "ckptd.daemon.cli", "serve", "--storage", str(workdir / "store"),
        "--listen", f"unix://{workdir / 'd.sock'}", "--ready-file", str(ready),
        "--max-inflight-bytes", str(max_inflight_bytes), *extra,
    ]  # fmt: skip
    with (workdir / "daemon.log").open("ab") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    running = DaemonProcess(proc, "")
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"daemon did not start: {(workdir / 'daemon.log').read_text()}")
            time.sleep(0.05)
        running.address = json.loads(ready.read_text())["address"]
        yield running
    finally:
        running.stop()


def perturb(state: dict[str, torch.Tensor]) -> None:
    """A cheap in-place change so each save carries a real (nonzero) delta."""
    for tensor in state.values():
        tensor.mul_(1.0001)


def time_ckptd(
    address: str,
    transport: str,
    state: dict[str, torch.Tensor],
    targets: dict[str, torch.Tensor],
    *,
    reps: int,
    burst: int,
) -> dict[str, Any]:
    """Stall, accepted and durable latency of single saves, then a back-to-back burst.

    Each timed save is paired with a bare copy of the same tensors right before it, so
    floor and stall are measured under the same load (the CPU may be shared).
    """
    floor: list[Clock] = []
    stalls: list[Clock] = []
    accepted, durable = [], []
    with Checkpointer(address, run=f"stall-{transport}", transport=transport) as ckpt:
        step = 0
        for _ in range(reps + 1):
            step += 1
            perturb(state)
            floor.append(bare_copy(state, targets))
            began = time.perf_counter()
            with Clock() as stall:
                handle = ckpt.save(step, state)
            stalls.append(stall)
            handle.wait_accepted()
            accepted.append(time.perf_counter() - began)
            handle.wait_durable()
            durable.append(time.perf_counter() - began)
        burst_stalls = []
        began = time.perf_counter()
        for _ in range(burst):
            step += 1
            perturb(state)
            save_began = time.perf_counter()
            ckpt.save(step, state)
            burst_stalls.append(time.perf_counter() - save_began)
        ckpt.wait()
        burst_s = time.perf_counter() - began
        used = ckpt.transport
        allocations = ckpt.staging_pool.stats.allocations
    nbytes = state_bytes(state)
    return {
        "transport": used,
        "floor_s": [c.wall_s for c in floor[1:]],
        "floor_cpu_s": [c.cpu_s for c in floor[1:]],
        "first_stall_s": stalls[0].wall_s,
        "stall_s": [c.wall_s for c in stalls[1:]],
        "stall_cpu_s": [c.cpu_s for c in stalls[1:]],
        "accepted_s": accepted[1:],
        "durable_s": durable[1:],
        "burst_saves": burst,
        "burst_stall_s": burst_stalls,
        "burst_s": burst_s,
        "sustained_MBps": burst * nbytes / burst_s / MB,
        "staging_allocations": allocations,
    }


def measure_size(
    label: str, nbytes: int, args: argparse.Namespace, workdir: Path
) -> dict[str, Any]:
    state = make_state(nbytes, args.device)
    actual = state_bytes(state)
    print(f"[{label}] {len(state)} tensors, {actual / MB:.1f} MB", flush=True)
    reps = args.reps if nbytes < 500 * MB else max(2, args.reps // 2)
    result: dict[str, Any] = {"label": label, "bytes": actual, "tensors": len(state), "reps": reps}
    targets = floor_targets(state)
    bare_copy(state, targets)  # touch the targets' pages once
    result["torch_save"] = time_torch_save(state, reps, workdir)
    result["ckptd"] = {}
    result["loop"] = []
    trainer = stall_loop.Trainer(state) if args.loop_kinds else None
    if trainer is not None:
        stall_loop.calibrate_idle(trainer)
    for transport in args.transports:
        run_dir = Path(tempfile.mkdtemp(prefix=f"{transport}-", dir=workdir))
        with daemon(run_dir, args.max_inflight_bytes) as proc:
            burst = 2 if nbytes >= 500 * MB else 4
            result["ckptd"][transport] = time_ckptd(
                proc.address, transport, state, targets, reps=reps, burst=burst
            )
            for kind in args.loop_kinds:
                for mode in stall_loop.MODES:
                    assert trainer is not None
                    loop = stall_loop.time_loop(
                        proc.address, transport, trainer, kind=kind, mode=mode, reps=reps,
                        floor=lambda: bare_copy(state, targets).wall_s,
                    )  # fmt: skip
                    result["loop"].append(loop)
                    print(
                        f"[{label}] loop {transport} {kind} {mode}: {loop_line(loop)}", flush=True
                    )
        shutil.rmtree(run_dir, ignore_errors=True)
        print(f"[{label}] {transport}: {summarize(result, transport)}", flush=True)
    return result


def ratios(result: dict[str, Any], transport: str) -> dict[str, float]:
    """Stall against the floor and torch.save, by wall clock and by CPU time.

    Wall clock is what the trainer waits; on a shared machine it swings with the load.
    CPU time (all threads of the process) is the work each one does, which the load
    barely changes, so it is the steadier comparison there.
    """
    run, saved = result["ckptd"][transport], result["torch_save"]
    stall, stall_cpu = median(run["stall_s"]), median(run["stall_cpu_s"])
    floor, floor_cpu = median(run["floor_s"]), median(run["floor_cpu_s"])
    return {
        "stall_over_floor": stall / floor,
        "stall_over_floor_cpu": stall_cpu / floor_cpu,
        "torch_save_over_stall": median(saved["save_s"]) / stall,
        "torch_save_over_stall_cpu": median(saved["save_cpu_s"]) / stall_cpu,
        "torch_save_fsync_over_stall": median(saved["save_fsync_s"]) / stall,
        # What no snapshotting checkpointer can beat: torch.save against a bare copy.
        "torch_save_over_floor": median(saved["save_s"]) / floor,
        "torch_save_over_floor_cpu": median(saved["save_cpu_s"]) / floor_cpu,
    }


def summarize(result: dict[str, Any], transport: str) -> str:
    run = result["ckptd"][transport]
    r = ratios(result, transport)
    return (
        f"stall {median(run['stall_s']) * 1e3:.1f} ms = {r['stall_over_floor']:.2f}x floor "
        f"(cpu {r['stall_over_floor_cpu']:.2f}x); torch.save {r['torch_save_over_stall']:.1f}x "
        f"slower (cpu {r['torch_save_over_stall_cpu']:.1f}x); durable "
        f"{median(run['durable_s']):.2f} s; sustained {run['sustained_MBps']:.0f} MB/s"
    )


def loop_line(loop: dict[str, Any]) -> str:
    s = stall_loop.summary(loop)
    return (
        f"iteration {s['iteration_s'] * 1e3:.0f} ms; blocked {s['blocked_s'] * 1e3:.1f} ms "
        f"(save {s['save_s'] * 1e3:.1f} + wait {s['wait_s'] * 1e3:.1f}), floor "
        f"{s['floor_s'] * 1e3:.1f} ms; iteration slower by {s['slowdown_s'] * 1e3:.1f} ms"
    )


def loop_table(results: list[dict[str, Any]]) -> str:
    columns = [
        "size", "transport", "iteration", "snapshot", "iteration ms", "floor ms", "save ms",
        "wait ms", "blocked ms", "blocked/floor", "torch.save/blocked", "slowdown ms",
        "torch.save/slowdown",
    ]  # fmt: skip
    rows = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    for result in results:
        saved = median(result["torch_save"]["save_s"])
        for loop in result.get("loop", []):
            s = stall_loop.summary(loop)
            cells = [
                result["label"], loop["transport"], loop["kind"], loop["mode"],
                f"{s['iteration_s'] * 1e3:.0f}", f"{s['floor_s'] * 1e3:.1f}",
                f"{s['save_s'] * 1e3:.2f}", f"{s['wait_s'] * 1e3:.2f}",
                f"{s['blocked_s'] * 1e3:.2f}", f"{s['blocked_s'] / s['floor_s']:.2f}",
                f"{saved / s['blocked_s']:.0f}", f"{s['slowdown_s'] * 1e3:.1f}",
                f"{saved / s['slowdown_s']:.1f}" if s["slowdown_s"] > 0 else "-",
            ]  # fmt: skip
            rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def table(results: list[dict[str, Any]]) -> str:
    columns = [
        "size", "transport", "floor ms", "stall ms", "stall/floor", "cpu: stall/floor",
        "first stall ms", "torch.save ms", "+fsync ms", "torch.save/stall",
        "cpu: torch.save/stall", "accepted s", "durable s", "sustained MB/s",
    ]  # fmt: skip
    rows = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    for result in results:
        saved = result["torch_save"]
        for transport, run in result["ckptd"].items():
            r = ratios(result, transport)
            cells = [
                result["label"], transport,
                f"{median(run['floor_s']) * 1e3:.1f}", f"{median(run['stall_s']) * 1e3:.1f}",
                f"{r['stall_over_floor']:.2f}", f"{r['stall_over_floor_cpu']:.2f}",
                f"{run['first_stall_s'] * 1e3:.0f}", f"{median(saved['save_s']) * 1e3:.0f}",
                f"{median(saved['save_fsync_s']) * 1e3:.0f}",
                f"{r['torch_save_over_stall']:.1f}", f"{r['torch_save_over_stall_cpu']:.1f}",
                f"{median(run['accepted_s']):.3f}", f"{median(run['durable_s']):.2f}",
                f"{run['sustained_MBps']:.0f}",
            ]  # fmt: skip
            rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def targets(results: list[dict[str, Any]]) -> list[str]:
    lines = []
    for result in results:
        if result["bytes"] < 50 * MB:
            continue
        for transport in result["ckptd"]:
            r = ratios(result, transport)
            name = f"{result['label']} {transport}"
            ok = r["stall_over_floor"] <= TARGET_STALL_OVER_FLOOR
            lines.append(
                f"- **{'PASS' if ok else 'FAIL'}** {name}: stall/floor "
                f"{r['stall_over_floor']:.2f} <= {TARGET_STALL_OVER_FLOOR} "
                f"(cpu time {r['stall_over_floor_cpu']:.2f})"
            )
            ok = r["torch_save_over_stall"] >= TARGET_TORCH_SAVE_OVER_STALL
            lines.append(
                f"- **{'PASS' if ok else 'FAIL'}** {name}: torch.save/stall "
                f"{r['torch_save_over_stall']:.1f} >= {TARGET_TORCH_SAVE_OVER_STALL} "
                f"(cpu time {r['torch_save_over_stall_cpu']:.1f}; with fsync "
                f"{r['torch_save_fsync_over_stall']:.1f}; the floor itself is "
                f"{r['torch_save_over_floor']:.1f}x, cpu {r['torch_save_over_floor_cpu']:.1f}x, "
                "below torch.save)"
            )
    for result in results:
        if result["bytes"] < 50 * MB:
            continue
        saved = median(result["torch_save"]["save_s"])
        for loop in result.get("loop", []):
            if loop["mode"] != "overlap":
                continue
            s = stall_loop.summary(loop)
            name = f"{result['label']} {loop['transport']} {loop['kind']} overlap"
            over_floor, below_save = s["blocked_s"] / s["floor_s"], saved / s["blocked_s"]
            ok = (
                over_floor <= TARGET_STALL_OVER_FLOOR and below_save >= TARGET_TORCH_SAVE_OVER_STALL
            )
            lines.append(
                f"- **{'PASS' if ok else 'FAIL'}** {name}: blocked/floor {over_floor:.2f} <= "
                f"{TARGET_STALL_OVER_FLOOR} and torch.save/blocked {below_save:.0f} >= "
                f"{TARGET_TORCH_SAVE_OVER_STALL} (iteration slower by "
                f"{s['slowdown_s'] * 1e3:.1f} ms = torch.save / "
                f"{saved / s['slowdown_s'] if s['slowdown_s'] > 0 else float('inf'):.1f})"
            )
    return lines


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10MB,100MB,1GB", help=f"comma list of {list(SIZES)}")
    parser.add_argument("--transports", default="shm,grpc", help="comma list of shm, grpc")
    parser.add_argument("--reps", type=int, default=5, help="timed saves per case (halved at 1GB)")
    parser.add_argument("--max-inflight-bytes", type=int, default=2 << 30,
                        help="the daemon's in-flight budget")  # fmt: skip
    parser.add_argument(
        "--loop-kinds",
        default=",".join(stall_loop.WORK_KINDS),
        help="training-loop iterations to time: cpu, idle (empty: none)",
    )
    parser.add_argument("--device", default="cpu", help="where the state lives: cpu or cuda")
    parser.add_argument("--out", type=Path, default=OUT_PATH)
    args = parser.parse_args(argv)
    args.sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in args.sizes if s not in SIZES]
    if unknown:
        parser.error(f"unknown sizes {unknown}; choose from {list(SIZES)}")
    args.transports = [t.strip() for t in args.transports.split(",") if t.strip()]
    args.loop_kinds = [k.strip() for k in args.loop_kinds.split(",") if k.strip()]
    unknown = [k for k in args.loop_kinds if k not in stall_loop.WORK_KINDS]
    if unknown:
        parser.error(f"unknown loop kinds {unknown}; choose from {list(stall_loop.WORK_KINDS)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    results = []
    with tempfile.TemporaryDirectory(prefix="ckptd-stall-") as tmp:
        for label in args.sizes:
            results.append(measure_size(label, SIZES[label], args, Path(tmp)))
    report: dict[str, Any] = {
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "device": args.device,
            "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
        },
        "command": " ".join(["python bench/stall.py", *(argv or sys.argv[1:])]),
        "results": results,
        "targets": targets(results),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print()
    print(table(results))
    print()
    print(loop_table(results))
    print()
    print("\n".join(report["targets"]))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
