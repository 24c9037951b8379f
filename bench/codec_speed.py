"""Delta codec speed: ``encode_delta`` / ``decode_delta`` before and after, side by side.

Each repetition runs, for every side (this checkout, and ``--before DIR``: a directory
holding an older ``ckptd`` package, as for ``bench/pipeline.py``), a fresh subprocess that
builds the same tensors from a fixed seed and times the codec on them; sides alternate
within a repetition, so both see the same load on a shared machine. Reported: median
seconds and MB/s (raw bytes of the tensor, 10^6), process CPU seconds (all threads: the
work, less distorted by other jobs than the wall clock), the after/before ratio of each,
and whether both sides wrote the same blob bytes (the format is the contract: a speed-up
must not change one byte).

Cases, each ``--elements`` elements (default 64 Mi: 256 MiB of float32):

* ``weights``: ``bench/pipeline.py``'s change (``w * 1.0001 + 1e-6`` of ``N(0, 0.02^2)``),
  ``bits="auto"`` as the daemon's default;
* ``synthetic``: ``bench/codec.py``'s digits-shaped change (zeros, damped and plain steps), b=3;
* ``log``: an Adam second moment (``U(0, 1e-6)`` times ``1 +- 1 %``) in the log domain, b=4;
* ``bf16``: the weights change in bfloat16, b=4;
* ``scaled``: an Adam first moment (``m' = 0.9 m + 0.1 g``, ``m`` and ``g`` of
  ``N(0, 1e-3^2)``) in the scaled domain, ``bits="auto"`` as the daemon's default;
* ``first_sq``: ``bench/pipeline.py``'s first delta of Adam's second moment (``U(0, 1e-6)``
  changed by ``x 1.0001 + 1e-6``: more than an octave for every element, so many
  exceptions), log domain, ``bits="auto"``.

Usage::

    python bench/codec_speed.py --before /tmp/ckptd-main/pkg [--elements N] [--reps 5]
    python bench/codec_speed.py --profile --cases weights      # where encode's time goes
    python bench/codec_speed.py --profile-chain --cases weights   # where a chain's goes
    python bench/codec_speed.py --stages --cases weights,log,scaled,bf16   # per stage, ns/element

*chain*: ``CHAIN`` deltas applied in turn to the reference, as a restore from storage does
(``codec.apply_deltas`` where the code has it, else ``decode_delta`` in place, one delta
after the other, on a copy of the reference: both sides start from the reference).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
OUT_PATH = REPO / "bench" / "out" / "codec_speed.json"
CASES = ("weights", "synthetic", "log", "bf16", "scaled", "first_sq")
KEYS = ("encode_s", "encode_cpu_s", "decode_s", "decode_cpu_s", "chain_s", "chain_cpu_s",
        "encode_out_s", "encode_out_cpu_s")
MB = 1e6
CHAIN = 10  # deltas applied in turn: bench/pipeline.py's deep restore


def make_case(case: str, n: int) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(current, reference, encode options) of one case; the same on both sides (seeded)."""
    rng = np.random.default_rng(17)
    if case == "synthetic":
        sys.path.insert(0, str(REPO))
        from bench.codec import make_synthetic

        ref, cur = make_synthetic(n, seed=17)
        return cur, ref, {"bits": 3}
    if case == "log":
        ref = rng.random(n, dtype=np.float32) * np.float32(1e-6)
        cur = ref * (np.float32(1) + np.float32(0.01) * rng.standard_normal(n, dtype=np.float32))
        return cur, ref, {"bits": 4, "domain": "log"}
    if case == "first_sq":
        ref = rng.random(n, dtype=np.float32) * np.float32(1e-6)
        return ref * np.float32(1.0001) + np.float32(1e-6), ref, {"bits": "auto",
                                                                  "domain": "log"}
    if case == "scaled":
        ref = rng.standard_normal(n, dtype=np.float32) * np.float32(1e-3)
        step = rng.standard_normal(n, dtype=np.float32) * np.float32(1e-4)
        return ref * np.float32(0.9) + step, ref, {"bits": "auto", "domain": "scaled"}
    ref = rng.standard_normal(n, dtype=np.float32) * np.float32(0.02)
    cur = ref * np.float32(1.0001) + np.float32(1e-6)
    if case == "bf16":
        to_bf16 = lambda a: (a.view(np.uint32) >> 16).astype(np.uint16)  # noqa: E731
        return to_bf16(cur), to_bf16(ref), {"bits": 4, "bfloat16": True}
    return cur, ref, {"bits": "auto"}


def worker(cases: list[str], n: int) -> dict[str, Any]:
    """Times one encode and one decode of each case in this process (the ``ckptd`` on the path)."""
    import xxhash
    from ckptd.daemon import codec

    results: dict[str, Any] = {}
    for case in cases:
        cur, ref, options = make_case(case, n)
        options = {"bfloat16": False, "domain": "linear", **options}
        codec.decode_delta(*_warm(codec, options))  # thread pools, zstd contexts, page cache
        wall, cpu = time.perf_counter(), time.process_time()
        blob, recon = codec.encode_delta(cur, ref, **options)
        enc = (time.perf_counter() - wall, time.process_time() - cpu)
        into = _encode_out_s(codec, cur, ref, recon, options)
        wall, cpu = time.perf_counter(), time.process_time()
        codec.decode_delta(blob, ref)
        dec = (time.perf_counter() - wall, time.process_time() - cpu)
        chain = _chain_s(codec, blob, ref)
        results[case] = {"encode_s": enc[0], "encode_cpu_s": enc[1], "decode_s": dec[0],
                         "decode_cpu_s": dec[1], "chain_s": chain[0], "chain_cpu_s": chain[1],
                         "encode_out_s": into[0], "encode_out_cpu_s": into[1],
                         "bytes": cur.nbytes, "blob_bytes": len(blob),
                         "blob_xxh3": xxhash.xxh3_64_hexdigest(blob)}
    return results


def profile(case: str, n: int, *, chain: bool = False) -> str:
    """cProfile of one ``encode_delta`` (``chain``: of one chain's restore, ``_chain``) on one
    thread (the ``ckptd`` on the path), top 12 by own time."""
    import cProfile
    import io
    import pstats

    from ckptd.daemon import codec
    from ckptd.daemon.codec import chunks

    chunks.MAX_THREADS = 1  # the profile then sees the work, not the waits on pool threads
    cur, ref, options = make_case(case, n)
    options = {"bfloat16": False, "domain": "linear", **options}
    blob, _ = codec.encode_delta(cur, ref, **options)
    call = (lambda: _chain(codec, blob, ref)) if chain else (
        lambda: codec.encode_delta(cur, ref, **options))
    call()
    profiler = cProfile.Profile()
    profiler.runcall(call)
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(12)
    return text.getvalue()


def stage_table(cases: list[str], n: int, reps: int) -> str:
    """``codec_stages`` of every case, as one markdown table."""
    sys.path.insert(0, str(REPO))
    from bench.codec_stages import markdown, stages

    results = {}
    for case in cases:
        cur, ref, options = make_case(case, n)
        results[case] = stages(cur, ref, {"bfloat16": False, "domain": "linear", **options}, reps)
    return markdown(results)


def _encode_out_s(codec: Any, cur: np.ndarray, ref: np.ndarray, recon: np.ndarray,
                  options: dict[str, Any]) -> tuple[float, float]:
    """Seconds (wall, CPU) of the same encode writing its reconstruction into ``recon``
    (mapped already, as a replaced chain head is in the daemon: ``out=``); NaN where this
    code has no ``out``."""
    if "out" not in inspect.signature(codec.encode_delta).parameters:
        return float("nan"), float("nan")
    wall, cpu = time.perf_counter(), time.process_time()
    codec.encode_delta(cur, ref, out=recon, **options)
    return time.perf_counter() - wall, time.process_time() - cpu


def _chain_s(codec: Any, blob: bytes, ref: np.ndarray) -> tuple[float, float]:
    """Seconds (wall, CPU) of ``_chain``."""
    wall, cpu = time.perf_counter(), time.process_time()
    _chain(codec, blob, ref)
    return time.perf_counter() - wall, time.process_time() - cpu


def _chain(codec: Any, blob: bytes, ref: np.ndarray) -> np.ndarray:
    """``CHAIN`` deltas applied in turn to ``ref``, as a restore does
    (``daemon/store/restore.py``): ``apply_deltas`` where this code has it, else one
    ``decode_delta`` after the other, in place where it can (a fresh array each before)."""
    if hasattr(codec, "apply_deltas"):
        return codec.apply_deltas([blob] * CHAIN, ref)
    in_place = "in_place" in inspect.signature(codec.decode_delta).parameters
    array = ref.copy()
    for _ in range(CHAIN):
        array = (codec.decode_delta(blob, array, in_place=True) if in_place
                 else codec.decode_delta(blob, array))
    return array


def _warm(codec: Any, options: dict[str, Any]) -> tuple[bytes, np.ndarray]:
    small = np.linspace(0, 1, 1 << 16, dtype=np.float32)
    cur = small if not options["bfloat16"] else (small.view(np.uint32) >> 16).astype(np.uint16)
    blob, _ = codec.encode_delta(cur, cur, **options)
    return blob, cur


def run_side(pythonpath: Path | None, cases: list[str], n: int) -> dict[str, Any]:
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = f"{pythonpath}{os.pathsep}{env.get('PYTHONPATH', '')}"
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--elements", str(n),
               "--cases", ",".join(cases)]
    done = subprocess.run(command, env=env, cwd="/", capture_output=True, text=True, check=True)
    return json.loads(done.stdout.splitlines()[-1])


def summarize(reps: list[dict[str, Any]], cases: list[str], sides: list[str]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for case in cases:
        row: dict[str, Any] = {}
        for side in sides:
            runs = [rep[side][case] for rep in reps]
            for key in KEYS:
                row[f"{side}_{key}"] = statistics.median(run[key] for run in runs)
            row[f"{side}_blob_bytes"] = runs[0]["blob_bytes"]
            row[f"{side}_blob_xxh3"] = sorted({run["blob_xxh3"] for run in runs})
        if "before" in sides:
            for key in KEYS:
                row[f"speedup_{key}"] = row[f"before_{key}"] / row[f"after_{key}"]
            row["identical_bytes"] = row["before_blob_xxh3"] == row["after_blob_xxh3"]
        summary[case] = row
    return summary


def markdown(summary: dict[str, Any], n: int, sides: list[str]) -> str:
    mb = 4 * n / MB
    lines = ["| case | side | encode MB/s | encode cpu s | into a mapped output MB/s | cpu s "
             f"| decode MB/s | decode cpu s | chain of {CHAIN} s | chain cpu s | blob MB |",
             "|---" * 11 + "|"]
    for case, row in summary.items():
        for side in sides:
            cells = [f"{mb / row[f'{side}_encode_s']:.0f}", f"{row[f'{side}_encode_cpu_s']:.2f}",
                     f"{mb / row[f'{side}_encode_out_s']:.0f}",
                     f"{row[f'{side}_encode_out_cpu_s']:.2f}",
                     f"{mb / row[f'{side}_decode_s']:.0f}", f"{row[f'{side}_decode_cpu_s']:.2f}",
                     f"{row[f'{side}_chain_s']:.2f}", f"{row[f'{side}_chain_cpu_s']:.2f}",
                     f"{row[f'{side}_blob_bytes'] / MB:.2f}"]
            lines.append(f"| {case} | {side} | " + " | ".join(cells) + " |")
    lines += ["", "| case | side | encode into a mapped output / into a new array: wall "
              "| cpu |", "|---|---|---|---|"]
    for case, row in summary.items():
        for side in sides:
            wall = row[f"{side}_encode_out_s"] / row[f"{side}_encode_s"]
            cpu = row[f"{side}_encode_out_cpu_s"] / row[f"{side}_encode_cpu_s"]
            lines.append(f"| {case} | {side} | {wall:.2f} | {cpu:.2f} |")
    if "before" in sides:
        lines += ["", "| before / after | encode wall | encode cpu | decode wall | decode cpu | "
                  "chain wall | chain cpu | same bytes |", "|---" * 8 + "|"]
        for case, row in summary.items():
            cells = " | ".join(f"{row[f'speedup_{key}']:.2f}" for key in KEYS[:6])
            lines.append(f"| {case} | {cells} | {row['identical_bytes']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--elements", type=int, default=1 << 26, help="per case (float32: x4 B)")
    parser.add_argument("--reps", type=int, default=5, help="interleaved repetitions")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma list of {CASES}")
    parser.add_argument("--before", type=Path, default=None, help="dir holding an older ckptd")
    parser.add_argument("--out", type=Path, default=OUT_PATH)
    parser.add_argument("--profile", action="store_true",
                        help="profile one encode of the first case instead (this process's ckptd: "
                        "PYTHONPATH=DIR for older code)")
    parser.add_argument("--profile-chain", action="store_true",
                        help=f"profile a chain of {CHAIN} deltas of the first case instead")
    parser.add_argument("--stages", action="store_true",
                        help="own thread-CPU ns per element of each encode stage, per case "
                        "(bench/codec_stages.py; this process's ckptd)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cases = [c for c in args.cases.split(",") if c]
    if unknown := set(cases) - set(CASES):
        parser.error(f"unknown cases {sorted(unknown)}; choose from {CASES}")
    if args.profile or args.profile_chain:
        print(profile(cases[0], args.elements, chain=args.profile_chain))
        return 0
    if args.stages:
        print(stage_table(cases, args.elements, args.reps))
        return 0
    if args.worker:
        print(json.dumps(worker(cases, args.elements)))
        return 0
    sides = ["before", "after"] if args.before else ["after"]
    paths = {"before": args.before, "after": None}  # after: the installed (this) checkout
    reps = []
    load_start = os.getloadavg()[0]
    for _ in range(args.reps):
        reps.append({side: run_side(paths[side], cases, args.elements) for side in sides})
    summary = summarize(reps, cases, sides)
    table = markdown(summary, args.elements, sides)
    report = {"command": "python bench/codec_speed.py " + " ".join(sys.argv[1:]),
              "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "elements": args.elements,
              "reps": args.reps, "load_avg_1m": [load_start, os.getloadavg()[0]],
              "cpus": len(os.sched_getaffinity(0)), "summary": summary, "runs": reps}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(table)
    print(f"load average {load_start:.1f} -> {os.getloadavg()[0]:.1f}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
