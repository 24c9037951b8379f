"""Memory benchmark: the daemon's resident memory stays within its stated bound (README,
"Memory bound") with many runs, many idle save streams and unread restores.

Three phases against one real ``ckptd serve`` subprocess (RSS read with psutil, sampled
every 10 ms), each compared with the bound ``bench.daemon.memory_bound`` extended by the
restore budget and with ``--max-resident-bytes`` in place of one head per chain:

* **runs** — ``--runs`` runs of ``--run-mb`` MB (one float32 tensor, one step each) saved
  by 4 client threads, then left idle: peak RSS, idle RSS afterwards, resident head bytes
  and evictions (from the daemon's metrics). Without the LRU the heads alone would hold
  runs x run-mb.
* **idle streams** — ``--idle-streams`` save streams of ``--idle-stream-mb`` MB from one
  trainer send their header and nothing else (they hold the whole in-flight budget and
  queue behind it);
  another trainer then saves: its wait (bounded by the stream idle timeout, not by the
  number of idle streams) and the peak RSS.
* **unread restores** — ``--unread-restores`` restores of one run, each on its own
  connection, read their header and stop reading; peak RSS and the bytes restores hold.

Usage (from the repository root)::

    .venv/bin/python bench/memory.py [--runs 50 --run-mb 40] [--out bench/out/memory.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import re
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ckptd.protos.v1 import pb, pb_grpc

from bench.daemon import MB, DaemonProcess, PeakRss, memory_bound, stream_requests, wait_durable

MiB = 1 << 20
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


def metric(daemon: DaemonProcess, name: str) -> float:
    """One unlabelled sample of the daemon's Prometheus endpoint."""
    with urllib.request.urlopen(f"http://{daemon.metrics_address}/metrics", timeout=10) as r:
        text = r.read().decode()
    match = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def start(workdir: Path, args: argparse.Namespace) -> DaemonProcess:
    daemon = DaemonProcess(
        workdir / "storage", "--metrics-listen", "127.0.0.1:0",
        "--max-inflight-bytes", f"{args.inflight_mb}MB",
        "--max-resident-bytes", f"{args.resident_mb}MB",
        "--max-restore-bytes", f"{args.restore_mb}MB",
        "--stream-idle-timeout-s", str(args.idle_timeout_s),
    )
    ready = sorted(workdir.glob("ready-*.json"))[-1]
    address = json.loads(ready.read_text())["metrics_address"]
    daemon.metrics_address = address  # type: ignore[attr-defined]
    return daemon


def measure_runs(daemon: DaemonProcess, args: argparse.Namespace) -> dict[str, Any]:
    nbytes = args.run_mb * MB // 4 * 4
    pending = list(range(args.runs))
    lock = threading.Lock()

    def client() -> None:
        with grpc.insecure_channel(daemon.address) as channel:
            stub = pb_grpc.CheckpointdServiceStub(channel)
            while True:
                with lock:
                    if not pending:
                        return
                    run = pending.pop()
                state = [np.random.default_rng(run).standard_normal(nbytes // 4, np.float32)]
                stub.Save(stream_requests(f"run{run:03d}", 0, 1, state), timeout=600)
                wait_durable(stub, f"run{run:03d}", 0, 1)

    started = time.perf_counter()
    with PeakRss(daemon.rss) as peak:
        threads = [threading.Thread(target=client) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    elapsed = time.perf_counter() - started
    time.sleep(2.0)  # idle: let freed buffers go back to the OS
    return {
        "runs": args.runs, "checkpoint_bytes": nbytes, "elapsed_s": round(elapsed, 1),
        "peak_rss": peak.peak, "idle_rss": daemon.rss(),
        "resident_head_bytes": metric(daemon, "ckptd_resident_reconstruction_bytes"),
        "evictions": metric(daemon, "ckptd_reconstruction_evictions_total"),
        "heads_without_lru_bytes": args.runs * nbytes,
    }


async def _idle_stream(run: str, nbytes: int) -> AsyncIterator[pb.SaveRequest]:
    spec = pb.TensorSpec(name="w", dtype=pb.DTYPE_FLOAT32, shape=[nbytes // 4], nbytes=nbytes)
    yield pb.SaveRequest(header=pb.SaveHeader(run=run, rank=0, step=1, tensors=[spec]))
    await asyncio.Event().wait()


async def _idle_streams(daemon: DaemonProcess, streams: int, nbytes: int) -> dict[str, Any]:
    async with grpc.aio.insecure_channel(daemon.address, options=OWN_CONNECTION) as hog:
        stub = pb_grpc.CheckpointdServiceStub(hog)
        calls = [stub.Save(_idle_stream(f"idle{i:03d}", nbytes)) for i in range(streams)]
        await asyncio.sleep(2.0)
        state = [np.ones(MB // 4, dtype=np.float32)]
        started = time.perf_counter()
        async with grpc.aio.insecure_channel(daemon.address, options=OWN_CONNECTION) as other:
            requests = stream_requests("other-trainer", 0, 1, state)
            await pb_grpc.CheckpointdServiceStub(other).Save(iter(requests), timeout=600)
        waited = time.perf_counter() - started
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
    codes: dict[str, int] = {}
    for outcome in outcomes:
        code = outcome.code().name if isinstance(outcome, grpc.aio.AioRpcError) else "OK"
        codes[code] = codes.get(code, 0) + 1
    return {"other_trainer_wait_s": round(waited, 2), "idle_stream_outcomes": codes}


def measure_idle_streams(daemon: DaemonProcess, args: argparse.Namespace) -> dict[str, Any]:
    with PeakRss(daemon.rss) as peak:
        nbytes = args.idle_stream_mb * MB
        result = asyncio.run(_idle_streams(daemon, args.idle_streams, nbytes))
    return {"streams": args.idle_streams, "stream_bytes": nbytes, **result, "peak_rss": peak.peak,
            "inflight_bytes_after": metric(daemon, "ckptd_inflight_bytes")}


async def _unread_restores(daemon: DaemonProcess, count: int) -> float:
    channels = [grpc.aio.insecure_channel(daemon.address, options=OWN_CONNECTION)
                for _ in range(count)]
    calls = [pb_grpc.CheckpointdServiceStub(ch).Restore(pb.RestoreRequest(run="run000"))
             for ch in channels]
    reads = [asyncio.ensure_future(call.read()) for call in calls]  # each reads one message
    try:
        await asyncio.wait(reads, timeout=3.0)
        return metric(daemon, "ckptd_restore_bytes")
    finally:
        for read in reads:
            read.cancel()
        for ch in channels:
            await ch.close()


def measure_unread_restores(daemon: DaemonProcess, args: argparse.Namespace) -> dict[str, Any]:
    with PeakRss(daemon.rss) as peak:
        held = asyncio.run(_unread_restores(daemon, args.unread_restores))
    return {"restores": args.unread_restores, "restore_bytes_held": held,
            "peak_rss": peak.peak}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--run-mb", type=int, default=40)
    parser.add_argument("--inflight-mb", type=int, default=256)
    parser.add_argument("--resident-mb", type=int, default=512)
    parser.add_argument("--restore-mb", type=int, default=256)
    parser.add_argument("--idle-timeout-s", type=float, default=5.0)
    parser.add_argument("--idle-streams", type=int, default=200)
    parser.add_argument("--idle-stream-mb", type=int, default=2)
    parser.add_argument("--unread-restores", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("bench/out/memory.json"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ckptd-memory-") as tmp:
        daemon = start(Path(tmp), args)
        baseline = daemon.rss()
        try:
            runs = measure_runs(daemon, args)
            idle = measure_idle_streams(daemon, args)
            restores = measure_unread_restores(daemon, args)
        finally:
            exit_code = daemon.stop()
    tensor = runs["checkpoint_bytes"]
    bound = memory_bound(baseline, args.inflight_mb * MB, args.resident_mb * MB, tensor)
    bound += args.restore_mb * MB
    peak = max(runs["peak_rss"], idle["peak_rss"], restores["peak_rss"])
    results = {
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
        "settings": vars(args) | {"out": str(args.out)},
        "baseline_rss": baseline, "bound_rss": bound, "peak_rss": peak,
        "within_bound": peak <= bound, "exit_code": exit_code,
        "runs": runs, "idle_streams": idle, "unread_restores": restores,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print_summary(results)
    return 0 if results["within_bound"] else 1


def print_summary(results: dict[str, Any]) -> None:
    mb = 1e6
    runs, idle, restores = results["runs"], results["idle_streams"], results["unread_restores"]
    print(f"bound {results['bound_rss'] / mb:.0f} MB (idle {results['baseline_rss'] / mb:.0f} MB)"
          f"; peak {results['peak_rss'] / mb:.0f} MB; within bound: {results['within_bound']}")
    print(f"runs: {runs['runs']} x {runs['checkpoint_bytes'] / mb:.0f} MB in "
          f"{runs['elapsed_s']} s; peak {runs['peak_rss'] / mb:.0f} MB, idle after "
          f"{runs['idle_rss'] / mb:.0f} MB; heads resident {runs['resident_head_bytes'] / mb:.0f}"
          f" MB (without the LRU {runs['heads_without_lru_bytes'] / mb:.0f} MB), "
          f"{runs['evictions']:.0f} evictions")
    print(f"idle streams: {idle['streams']} x {idle['stream_bytes'] / mb:.0f} MB; another "
          f"trainer waited {idle['other_trainer_wait_s']} s; outcomes "
          f"{idle['idle_stream_outcomes']}; peak {idle['peak_rss'] / mb:.0f} MB")
    print(f"unread restores: {restores['restores']}; restore bytes held "
          f"{restores['restore_bytes_held'] / mb:.0f} MB; peak {restores['peak_rss'] / mb:.0f} MB")


if __name__ == "__main__":
    sys.exit(main())
