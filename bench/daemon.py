"""Daemon benchmark: responsiveness under load, concurrent clients and memory, throughput.

Three measurements against a real ``ckptd serve`` subprocess (its RSS read with psutil):

* **latency** — p50/p99/max of gRPC health ``Check`` and ``ListRuns`` while idle and while a
  ``--size-gb`` checkpoint (float32, in 64 MiB tensors) is being compressed: a lossless base
  first, then the measured lossy delta from ACCEPTED to DURABLE. The event loop must stay
  responsive because all codec and storage work runs in the engine's pools.
* **concurrent** — ``--clients`` clients (one run/rank each) save ``--client-steps``
  checkpoints of ``--client-mb`` MB at once through a daemon whose ``max_inflight_bytes`` is
  ``--inflight-mb``; every save must reach DURABLE, and the daemon's peak RSS (sampled every
  10 ms) must stay inside its stated bound (``memory_bound``): idle RSS + max_inflight_bytes
  + one reconstruction per (run, rank) + the encode workers' working memory.
* **throughput** — one client saves ``--throughput-steps`` checkpoints of
  ``--throughput-mb`` MB back to back (streamed over gRPC in 1 MiB chunks); MB/s of raw bytes
  from the first byte sent to the last step DURABLE, and until the last ACCEPTED.

Usage (from the repository root)::

    .venv/bin/python bench/daemon.py [--size-gb 1] [--out bench/out/daemon.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psutil
from ckptd.protos.v1 import pb, pb_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

MB = 1_000_000
MiB = 1 << 20
TENSOR_BYTES = 64 * MiB


class DaemonProcess:
    """``python -m ckptd.daemon.cli serve`` on 127.0.0.1:0; RSS sampled on demand.

    ``storage`` is a directory or a storage URL (``s3://...``); ready file and log go to
    ``workdir`` (default: the directory's parent). ``env`` replaces the environment.
    """

    def __init__(
        self, storage: Path | str, *args: str, workdir: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        workdir = workdir or Path(storage).parent
        ready = workdir / f"ready-{time.monotonic_ns()}.json"
        self.log_path = workdir / "daemon.log"  # appended to by every daemon of workdir
        cmd = [sys.executable, "-m", "ckptd.daemon.cli", "serve", "--storage", str(storage),
               "--listen", "127.0.0.1:0", "--ready-file", str(ready), *args]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 120
        while not ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"daemon did not start:\n{self.log_path.read_text()[-3000:]}")
            time.sleep(0.02)
        self.address: str = json.loads(ready.read_text())["address"]
        self.ps = psutil.Process(self.proc.pid)

    def rss(self) -> int:
        return int(self.ps.memory_info().rss)

    def stop(self) -> int:
        self.proc.terminate()
        return self.proc.wait(600)


class PeakRss:
    """Samples a process's RSS every ``interval_s`` on a thread; ``peak`` is the maximum."""

    def __init__(self, sample: Callable[[], int], interval_s: float = 0.01) -> None:
        self.peak = sample()
        self._sample, self._interval_s = sample, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.peak = max(self.peak, self._sample())

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def stream_requests(run: str, rank: int, step: int, arrays: list[np.ndarray]) -> Iterator[Any]:
    """A save stream: the header, then each float32 tensor in 1 MiB chunks."""
    specs = [
        pb.TensorSpec(name=f"t{i:03d}", dtype=pb.DTYPE_FLOAT32, shape=a.shape, nbytes=a.nbytes)
        for i, a in enumerate(arrays)
    ]
    yield pb.SaveRequest(header=pb.SaveHeader(run=run, rank=rank, step=step, tensors=specs))
    for index, array in enumerate(arrays):
        raw = array.reshape(-1).view(np.uint8)
        for offset in range(0, raw.size, MiB):
            data = raw[offset : offset + MiB].tobytes()
            yield pb.SaveRequest(chunk=pb.TensorChunk(tensor_index=index, offset=offset, data=data))


def wait_durable(stub: Any, run: str, rank: int, step: int) -> None:
    ref = pb.StepRef(run=run, rank=rank, step=step)
    status = stub.WaitSave(pb.WaitSaveRequest(ref=ref, timeout_s=3600), timeout=3700).status
    if status.state != pb.SAVE_STATE_DURABLE:
        raise RuntimeError(f"{run}/{rank}/{step} ended {status}")


def percentiles(samples_s: list[float]) -> dict[str, float]:
    ordered = sorted(samples_s)
    if not ordered:
        return {}
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return {"n": len(ordered), "p50_ms": 1e3 * statistics.median(ordered),
            "p99_ms": 1e3 * p99, "max_ms": 1e3 * ordered[-1]}


class Prober:
    """Times health ``Check`` and ``ListRuns`` back to back on a thread while in its block."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.samples: dict[str, list[float]] = {"health": [], "list_runs": []}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with grpc.insecure_channel(self.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            stub = pb_grpc.CheckpointdServiceStub(channel)
            while not self._stop.is_set():
                start = time.perf_counter()
                health.Check(health_pb2.HealthCheckRequest(), timeout=60)
                middle = time.perf_counter()
                stub.ListRuns(pb.ListRunsRequest(), timeout=60)
                self.samples["health"].append(middle - start)
                self.samples["list_runs"].append(time.perf_counter() - middle)
                self._stop.wait(0.005)

    def summary(self) -> dict[str, dict[str, float]]:
        return {rpc: percentiles(samples) for rpc, samples in self.samples.items()}

    def __enter__(self) -> Prober:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def measure_latency(workdir: Path, size_gb: float) -> dict[str, Any]:
    inflight = int(2.2 * size_gb * 2**30)
    daemon = DaemonProcess(workdir / "latency", "--max-inflight-bytes", str(inflight))
    count = max(1, int(size_gb * 2**30) // TENSOR_BYTES)
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(TENSOR_BYTES // 4, dtype=np.float32) * np.float32(0.02)
              for _ in range(count)]
    with grpc.insecure_channel(daemon.address) as channel:
        stub = pb_grpc.CheckpointdServiceStub(channel)
        with Prober(daemon.address) as idle:
            time.sleep(3)
        stub.Save(stream_requests("big", 0, 1, arrays), timeout=3600)
        wait_durable(stub, "big", 0, 1)
        for index in range(count):  # the next step: a small update everywhere → a lossy delta
            noise = rng.standard_normal(arrays[index].size, dtype=np.float32)
            arrays[index] += noise * np.float32(1e-3)
        started = time.perf_counter()
        stub.Save(stream_requests("big", 0, 2, arrays), timeout=3600)
        accepted = time.perf_counter()
        with PeakRss(daemon.rss) as peak, Prober(daemon.address) as busy:
            wait_durable(stub, "big", 0, 2)
            durable = time.perf_counter()
    return {
        "checkpoint_bytes": sum(a.nbytes for a in arrays), "tensors": count,
        "stream_s": accepted - started, "compress_s": durable - accepted,
        "daemon_peak_rss": peak.peak, "idle": idle.summary(), "compressing": busy.summary(),
        "exit_code": daemon.stop(),
    }


ENCODE_WORKERS = 2  # EngineConfig's defaults, which the benchmarked daemon runs with
STORAGE_WORKERS = 4
CODEC_SCRATCH_BYTES = 32 * MiB  # per codec call: up to 4 threads x ~6 MiB of chunk temporaries


def memory_bound(baseline: int, inflight: int, reconstructions: int, largest_tensor: int) -> int:
    """The daemon's stated resident bound (README "Memory bound"): its idle RSS, the
    in-flight budget, one reconstruction per (run, rank), and the encoded blobs that may
    exist at once across all saves: per encode worker the codec's scratch plus a blob being
    assembled and its parts, per storage worker one blob awaiting its write (each at most
    about the tensor's raw size, for a lossless base)."""
    working = (ENCODE_WORKERS * (CODEC_SCRATCH_BYTES + 2 * largest_tensor)
               + STORAGE_WORKERS * largest_tensor)
    return baseline + inflight + reconstructions + working


def measure_concurrent(workdir: Path, clients: int, client_mb: int, steps: int,
                       inflight_mb: int) -> dict[str, Any]:
    inflight = inflight_mb * MB
    daemon = DaemonProcess(workdir / "concurrent", "--max-inflight-bytes", str(inflight))
    baseline = daemon.rss()
    state_bytes = client_mb * MB // 4 * 4
    errors: list[BaseException] = []

    def client(index: int) -> None:
        rng = np.random.default_rng(index)
        state = [rng.standard_normal(state_bytes // 4, dtype=np.float32)]
        update = rng.standard_normal(state[0].size, dtype=np.float32) * np.float32(1e-3)
        try:
            with grpc.insecure_channel(daemon.address) as channel:
                stub = pb_grpc.CheckpointdServiceStub(channel)
                for step in range(1, steps + 1):
                    state[0] += update
                    stub.Save(stream_requests(f"job{index}", index, step, state), timeout=3600)
                for step in range(1, steps + 1):
                    wait_durable(stub, f"job{index}", index, step)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    with PeakRss(daemon.rss) as peak:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    elapsed = time.perf_counter() - started
    bound = memory_bound(baseline, inflight, clients * state_bytes, state_bytes)
    return {
        "clients": clients, "steps_per_client": steps, "checkpoint_bytes": state_bytes,
        "max_inflight_bytes": inflight, "all_durable": not errors,
        "errors": [repr(e) for e in errors], "elapsed_s": elapsed,
        "baseline_rss": baseline, "peak_rss": peak.peak, "bound_rss": bound,
        "within_bound": peak.peak <= bound, "exit_code": daemon.stop(),
    }


def measure_throughput(workdir: Path, size_mb: int, steps: int) -> dict[str, Any]:
    daemon = DaemonProcess(workdir / "throughput")
    rng = np.random.default_rng(1)
    count = max(1, size_mb * MB // TENSOR_BYTES)
    elements = size_mb * MB // 4 // count
    arrays = [rng.standard_normal(elements, dtype=np.float32) for _ in range(count)]
    update = rng.standard_normal(elements, dtype=np.float32) * np.float32(1e-3)
    total = 0
    with grpc.insecure_channel(daemon.address) as channel:
        stub = pb_grpc.CheckpointdServiceStub(channel)
        started = time.perf_counter()
        for step in range(1, steps + 1):
            for array in arrays:  # an update everywhere, like a training step's
                np.add(array, update, out=array)
            stub.Save(stream_requests("tput", 0, step, arrays), timeout=3600)
            total += sum(a.nbytes for a in arrays)
        accepted = time.perf_counter()
        wait_durable(stub, "tput", 0, steps)
        durable = time.perf_counter()
    return {"checkpoint_bytes": total // steps, "steps": steps,
            "accept_mb_s": total / MB / (accepted - started),
            "durable_mb_s": total / MB / (durable - started), "exit_code": daemon.stop()}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=1.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--client-mb", type=int, default=32)
    parser.add_argument("--client-steps", type=int, default=3)
    parser.add_argument("--inflight-mb", type=int, default=128)
    parser.add_argument("--throughput-mb", type=int, default=64)
    parser.add_argument("--throughput-steps", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("bench/out/daemon.json"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ckptd-bench-") as tmp:
        workdir = Path(tmp)
        for name in ("latency", "concurrent", "throughput"):
            (workdir / name).mkdir()
        results = {
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
            "latency": measure_latency(workdir, args.size_gb),
            "concurrent": measure_concurrent(workdir, args.clients, args.client_mb,
                                             args.client_steps, args.inflight_mb),
            "throughput": measure_throughput(workdir, args.throughput_mb, args.throughput_steps),
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print_summary(results)
    concurrent = results["concurrent"]
    return 0 if concurrent["all_durable"] and concurrent["within_bound"] else 1


def print_summary(results: dict[str, Any]) -> None:
    lat, con, tput = results["latency"], results["concurrent"], results["throughput"]
    print(f"latency while a {lat['checkpoint_bytes'] / 2**30:.2f} GiB delta compresses "
          f"({lat['compress_s']:.1f} s):")
    for phase in ("idle", "compressing"):
        for rpc in ("health", "list_runs"):
            p = lat[phase][rpc]
            print(f"  {phase:11s} {rpc:9s} p50 {p['p50_ms']:7.2f} ms  p99 {p['p99_ms']:7.2f} ms  "
                  f"max {p['max_ms']:7.2f} ms  (n={p['n']})")
    print(f"concurrent: {con['clients']} clients x {con['steps_per_client']} saves of "
          f"{con['checkpoint_bytes'] / MB:.0f} MB, all durable: {con['all_durable']}, "
          f"peak RSS {con['peak_rss'] / MB:.0f} MB <= bound {con['bound_rss'] / MB:.0f} MB: "
          f"{con['within_bound']} ({con['elapsed_s']:.1f} s)")
    print(f"throughput: {tput['steps']} saves of {tput['checkpoint_bytes'] / MB:.0f} MB: accepted "
          f"{tput['accept_mb_s']:.0f} MB/s, durable {tput['durable_mb_s']:.0f} MB/s")


if __name__ == "__main__":
    sys.exit(main())
