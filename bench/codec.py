"""Codec benchmark: size, error, speed and memory of ``ckptd.daemon.codec``.

Two workloads:

* **digits** — a small CNN trained on scikit-learn's digits (``bench.digits``), SGD+momentum
  and Adam; weights *and* optimizer state are checkpointed every K steps and chained as the
  daemon chains them: the first checkpoint is the (lossless) base, and each later tensor is
  encoded as a delta against the previous *reconstruction*. Tensors smaller than the
  daemon's ``min_lossy_elements`` go through ``encode_exact``, as the daemon stores them.
* **synthetic** — one large float32 tensor (100M elements by default): reference ~
  N(0, 0.02²) like freshly initialised weights, current = reference + an update shaped like
  the digits deltas (``make_synthetic``). Used for throughput and peak memory.

Speed is reported as a ratio to zstd level 1 on the *same raw float32 bytes in the same
run* (so the numbers survive a change of machine): encode ratio = our encode MB/s ÷
zstd-1 compress MB/s; decode ratio = our decode MB/s ÷ zstd-1 *compress* MB/s (the target's
definition), with the ratio to zstd-1 decompress given too. MB/s always counts raw float32
input bytes (10⁶ bytes). Each of ``--repeats`` rounds runs zstd-1 compress, encode, zstd-1
decompress and decode in turn (the machine is shared: a baseline timed minutes apart from
the codec is no yardstick), and the best wall-clock time of each is kept; the best process
CPU times are kept too, as a cross-check that other jobs on the machine distort less.

Extra peak memory is measured with ``tracemalloc`` (numpy and zstandard report their
buffers to it) as the peak of bytes allocated during the call, outputs included, divided by
the tensor's float32 size; an RSS high-water mark sampled by a thread every 1 ms is given
as a cross-check (it also sees allocations that bypass tracemalloc).

Usage (from the repository root)::

    .venv/bin/python bench/codec.py [--quick] [--elements 100000000] [--out bench/out/codec.json]
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import gc
import inspect
import io
import json
import math
import os
import pstats
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import numpy as np
import psutil
import zstandard

if __package__ in (None, ""):  # run as `python bench/codec.py`: make `bench.*` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.codec_report import (
    COLUMNS_NOTE,
    evaluate_targets,
    machine_info,
    summary_markdown,
    update_readme,
)
from bench.digits import DigitsConfig, Snapshot, iter_snapshots

T = TypeVar("T")
MB = 1e6
CHUNK_ELEMENTS = 1 << 22  # bounds the temporaries of the bench's own full-tensor passes


@dataclass(frozen=True)
class BenchConfig:
    """What one run measures; ``--quick`` shrinks everything for the smoke test."""

    quick: bool
    elements: int
    repeats: int
    bits: tuple[int, ...]
    coders: tuple[str, ...]
    digits_width: int
    digits_snapshots: int
    digits_every_steps: int
    profile: bool


# ---------------------------------------------------------------------------- measurement


class _RssSampler(threading.Thread):
    """Samples this process's RSS every ``interval_s`` until stopped; keeps the maximum."""

    def __init__(self, interval_s: float = 0.001) -> None:
        super().__init__(daemon=True)
        self._process = psutil.Process()
        self._interval_s = interval_s
        self._stop_event = threading.Event()
        self.base = self._process.memory_info().rss
        self.peak = self.base

    def run(self) -> None:
        while not self._stop_event.wait(self._interval_s):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


def extra_peak_bytes(fn: Callable[[], object]) -> tuple[int, int]:
    """Runs ``fn`` once; returns (tracemalloc peak, RSS high-water mark) above the start.

    The result is dropped only after the peak is read, so outputs count as extra memory.
    """
    gc.collect()
    sampler = _RssSampler()
    tracemalloc.start()
    sampler.start()
    result = fn()
    sampler.stop()
    traced_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    del result
    return traced_peak, sampler.peak - sampler.base


def _chunks(n: int) -> Iterator[slice]:
    for start in range(0, n, CHUNK_ELEMENTS):
        yield slice(start, min(n, start + CHUNK_ELEMENTS))


def sq_norm_diff(a: np.ndarray, b: np.ndarray | None = None) -> float:
    """‖a - b‖² (or ‖a‖²) in float64, chunked so a 100M-element tensor costs no full copy."""
    a, total = a.reshape(-1), 0.0
    flat_b = None if b is None else b.reshape(-1)
    for part in _chunks(a.size):
        x = a[part] if flat_b is None else a[part] - flat_b[part]
        x64 = x.astype(np.float64)
        total += float(np.dot(x64, x64))
    return total


# --------------------------------------------------------------------------- symbol model


def bucket_histogram(current: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Counts of δ = current - reference per (sign, biased exponent) key: 512 buckets."""
    counts = np.zeros(512, dtype=np.int64)
    cur, ref = current.reshape(-1), reference.reshape(-1)
    for part in _chunks(cur.size):
        keys = (cur[part] - ref[part]).view(np.uint32) >> 23
        counts += np.bincount(keys, minlength=512)
    return counts


def kept_keys(counts: np.ndarray, bits: int) -> np.ndarray:
    """The 2^b - 1 populated buckets with the largest exponents (the method's promotion).

    Exponents 0 (zeros, subnormals) and 255 (Inf/NaN) are never kept; of the two signs of one
    exponent the more populated wins a last free slot. This restates the method (the docstring of
    ``ckptd.daemon.codec.quantize``) without reading the codec.
    """
    keys = np.flatnonzero(counts)
    keys = keys[((keys & 0xFF) != 0) & ((keys & 0xFF) != 0xFF)]
    order = np.lexsort((-counts[keys], -(keys & 0xFF)))
    return keys[order][: (1 << bits) - 1]


def symbol_stats(counts: np.ndarray, bits: int) -> tuple[float, float]:
    """(p(0), order-0 entropy in bits/element) of the symbol stream the method would emit."""
    total = int(counts.sum())
    kept = counts[kept_keys(counts, bits)] / total
    probs = np.append(kept, 1.0 - kept.sum())
    probs = probs[probs > 0]
    return float(1.0 - kept.sum()), float(-(probs * np.log2(probs)).sum())


# --------------------------------------------------------------------------------- digits


def digits_snapshots(config: BenchConfig, optimizer: str) -> list[Snapshot]:
    return list(
        iter_snapshots(
            DigitsConfig(
                optimizer=optimizer,  # type: ignore[arg-type]
                width=config.digits_width,
                num_snapshots=config.digits_snapshots,
                snapshot_every_steps=config.digits_every_steps,
            )
        )
    )


@dataclass
class _ChainTotals:
    """Sums over every delta checkpoint of one chain."""

    lossy_elements: int = 0
    delta_bytes: int = 0
    exact_bytes: int = 0
    encode_s: float = 0.0
    decode_s: float = 0.0
    symbol_bits: float = 0.0
    zero_symbols: float = 0.0
    model_mismatches: int = 0
    decode_matches: bool = True


def _encode_tensor(
    codec: ModuleType, u: np.ndarray, ref: np.ndarray, *, bits: int, coder: str,
    totals: _ChainTotals,
) -> tuple[np.ndarray, float, float]:
    """Encodes one lossy delta; returns (reconstruction, ‖u-ũ‖², ‖δ-δ̃‖²) and updates totals."""
    start = time.perf_counter()
    blob, rec = codec.encode_delta(u, ref, bits=bits, coder=coder)
    totals.encode_s += time.perf_counter() - start
    start = time.perf_counter()
    decoded = codec.decode_delta(blob, ref)
    totals.decode_s += time.perf_counter() - start
    totals.decode_matches &= bool(np.array_equal(decoded.view(np.uint32), rec.view(np.uint32)))
    counts = bucket_histogram(u, ref)
    p0, entropy = symbol_stats(counts, bits)
    zero_by_model = ~np.isin((u - ref).view(np.uint32) >> 23, kept_keys(counts, bits))
    totals.model_mismatches += int(np.count_nonzero(zero_by_model & (rec != ref)))
    totals.lossy_elements += u.size
    totals.delta_bytes += len(blob)
    totals.symbol_bits += entropy * u.size
    totals.zero_symbols += p0 * u.size
    err_delta = sq_norm_diff((u - ref) - (rec - ref))
    return rec, sq_norm_diff(u, rec), err_delta


def _group(name: str) -> str:
    """``"weights"`` for ``model/*``, ``"optimizer"`` for ``optim/*`` (``bench.digits`` names)."""
    return "optimizer" if name.startswith("optim/") else "weights"


def run_chain(
    codec: ModuleType, snaps: list[Snapshot], bits: int, coder: str, min_lossy: int
) -> dict[str, Any]:
    """Chains ``snaps`` through the codec (delta vs previous reconstruction) and sums up.

    Relative errors are per checkpoint over its lossy tensors (sums of squares, then the
    root), for all of them and for weights and optimizer state apart: the moments often
    carry most of the error.
    """
    recon = {name: a.copy() for name, a in snaps[0].tensors.items()}  # base: lossless
    totals = _ChainTotals()
    errors: dict[str, list[float]] = {}
    for snap in snaps[1:]:
        sums: dict[str, float] = {}
        for name, u in snap.tensors.items():
            ref = recon[name]
            if u.size < min_lossy:
                totals.exact_bytes += len(codec.encode_exact(u))
                recon[name] = u.copy()
                continue
            recon[name], du, dd = _encode_tensor(codec, u, ref, bits=bits, coder=coder,
                                                  totals=totals)
            for group in ("all", _group(name)):
                for key, value in (("u", du), ("nu", sq_norm_diff(u)), ("d", dd),
                                   ("nd", sq_norm_diff(u, ref))):
                    sums[f"{group}/{key}"] = sums.get(f"{group}/{key}", 0.0) + value
        for group in ("all", "weights", "optimizer"):
            if f"{group}/nu" in sums:
                errors.setdefault(f"u/{group}", []).append(
                    math.sqrt(sums[f"{group}/u"] / sums[f"{group}/nu"]))
                errors.setdefault(f"d/{group}", []).append(
                    math.sqrt(sums[f"{group}/d"] / max(sums[f"{group}/nd"], 1e-300)))
    n, raw = totals.lossy_elements, 4 * totals.lossy_elements
    return {
        "bits": bits, "coder": coder, "delta_bytes": totals.delta_bytes,
        "ratio_vs_raw": raw / totals.delta_bytes,
        "checkpoint_bytes": totals.delta_bytes + totals.exact_bytes,
        "achieved_bits_per_element": 8 * totals.delta_bytes / n,
        "entropy_bits_per_element": totals.symbol_bits / n, "p0": totals.zero_symbols / n,
        "symbol_model_mismatches": totals.model_mismatches,
        "rel_err_u_mean": float(np.mean(errors["u/all"])),
        "rel_err_u_max": float(np.max(errors["u/all"])),
        "rel_err_delta_mean": float(np.mean(errors["d/all"])),
        "rel_err_delta_max": float(np.max(errors["d/all"])),
        **{f"rel_err_{kind}_max_{group}": float(np.max(errors[f"{kind[0]}/{group}"]))
           for kind in ("u", "delta") for group in ("weights", "optimizer")
           if f"u/{group}" in errors},
        "encode_mb_s": raw / MB / totals.encode_s, "decode_mb_s": raw / MB / totals.decode_s,
        "decode_matches_encode": totals.decode_matches,
    }


def bench_digits(codec: ModuleType, config: BenchConfig, min_lossy: int) -> dict[str, Any]:
    """Every (optimizer, b, coder) chain over the digits checkpoints."""
    out: dict[str, Any] = {}
    for optimizer in ("sgd", "adam"):
        snaps = digits_snapshots(config, optimizer)
        deltas = [s.tensors for s in snaps[1:]]
        lossy = [a for t in deltas for a in t.values() if a.size >= min_lossy]
        raw_all = sum(a.nbytes for t in deltas for a in t.values())
        lossless_lossy = sum(len(codec.encode_exact(a)) for a in lossy)
        lossless_all = sum(len(codec.encode_exact(a)) for t in deltas for a in t.values())
        results = [
            run_chain(codec, snaps, bits, coder, min_lossy)
            for bits in config.bits
            for coder in config.coders
        ]
        for r in results:
            r["ratio_vs_lossless"] = lossless_lossy / r["delta_bytes"]
            r["checkpoint_ratio_vs_raw"] = raw_all / r["checkpoint_bytes"]
        out[optimizer] = {
            "steps": [s.step for s in snaps], "final_loss": snaps[-1].loss,
            "delta_checkpoints": len(deltas),
            "lossy_elements_per_checkpoint": sum(a.size for a in lossy) // len(deltas),
            "exact_elements_per_checkpoint": sum(a.size for t in deltas for a in t.values())
            // len(deltas) - sum(a.size for a in lossy) // len(deltas),
            "lossless_ratio_vs_raw": 4 * sum(a.size for a in lossy) / lossless_lossy,
            "lossless_checkpoint_ratio_vs_raw": raw_all / lossless_all,
            "results": results,
        }
    return out


# ------------------------------------------------------------------------------ synthetic


def make_synthetic(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(reference, current) of ``n`` float32 elements, generated in chunks.

    reference ~ N(0, 0.02²), a typical init scale. current = reference + 1e-3 · z · s with
    z ~ N(0, 1) and a per-element scale s that mimics the digits deltas (same p(0) range at
    b = 2..4): 10 % exact zeros (units that got no gradient), 40 % damped by 2^-U(0, 10)
    (small, many binades), 50 % undamped. A plain Gaussian would crowd into a few exponents.
    """
    rng = np.random.default_rng(seed)
    reference = np.empty(n, dtype=np.float32)
    current = np.empty(n, dtype=np.float32)
    for part in _chunks(n):
        size = part.stop - part.start
        rng.standard_normal(size, dtype=np.float32, out=reference[part])
        reference[part] *= np.float32(0.02)
        kind = rng.random(size, dtype=np.float32)
        scale = np.exp2(np.float32(-10.0) * rng.random(size, dtype=np.float32))
        scale[kind >= 0.5] = 1.0
        scale[kind < 0.1] = 0.0
        step = rng.standard_normal(size, dtype=np.float32)
        step *= scale
        step *= np.float32(1e-3)
        np.add(reference[part], step, out=current[part])
    return reference, current


def _timed(fn: Callable[[], T], best: dict[str, float], op: str) -> T:
    """Runs ``fn``; keeps the lowest wall-clock (``op``) and process CPU (``op/cpu``) seconds.

    CPU seconds count every thread of the process, so they measure work, not latency: a
    load-independent cross-check of the wall-clock ratios on a shared machine.
    """
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    best[op] = min(best.get(op, math.inf), time.perf_counter() - wall)
    best[f"{op}/cpu"] = min(best.get(f"{op}/cpu", math.inf), time.process_time() - cpu)
    return result


def paired_timings(
    codec: ModuleType, ref: np.ndarray, cur: np.ndarray, *, bits: int, coder: str, repeats: int
) -> tuple[dict[str, float], bytes, np.ndarray, bool, float]:
    """Best-of-``repeats`` seconds of encode, decode and zstd-1 on the same bytes.

    The four operations alternate within each round, so the baseline and the codec see the
    same machine load (the bench machine is shared; a baseline taken minutes apart is not a
    fair yardstick). Returns (best wall and CPU seconds by op, blob, reconstruction, decode
    == encode's reconstruction bit for bit in every round, zstd-1 ratio).
    """
    raw = cur.reshape(-1).view(np.uint8).data
    best: dict[str, float] = {}
    blob, rec, frame, matches = b"", cur, b"", True
    for _ in range(repeats):
        frame = _timed(partial(zstandard.ZstdCompressor(level=1).compress, raw), best,
                       "zstd1_compress")
        rec = cur  # drop the previous round's reconstruction before allocating the next
        blob, rec = _timed(partial(codec.encode_delta, cur, ref, bits=bits, coder=coder), best,
                           "encode")
        _timed(partial(zstandard.ZstdDecompressor().decompress, frame), best, "zstd1_decompress")
        decoded = _timed(partial(codec.decode_delta, blob, ref), best, "decode")
        matches &= bool(np.array_equal(decoded.view(np.uint32), rec.view(np.uint32)))
        del decoded
    return best, blob, rec, matches, cur.nbytes / len(frame)


def bench_synthetic_case(
    codec: ModuleType, ref: np.ndarray, cur: np.ndarray, *, bits: int, coder: str, repeats: int
) -> dict[str, Any]:
    """Throughput, memory, size and error of one (b, coder) on the synthetic tensor."""
    best, blob, rec, matches, zstd_ratio = paired_timings(
        codec, ref, cur, bits=bits, coder=coder, repeats=repeats)
    p0, entropy = symbol_stats(bucket_histogram(cur, ref), bits)
    err_u = math.sqrt(sq_norm_diff(cur, rec) / sq_norm_diff(cur))
    del rec
    enc_traced, enc_rss = extra_peak_bytes(
        lambda: codec.encode_delta(cur, ref, bits=bits, coder=coder))
    dec_traced, dec_rss = extra_peak_bytes(lambda: codec.decode_delta(blob, ref))
    mb_s = {op: cur.nbytes / MB / seconds for op, seconds in best.items()}
    cpu_ratios = {
        "encode_cpu_x_zstd1_compress": mb_s["encode/cpu"] / mb_s["zstd1_compress/cpu"],
        "decode_cpu_x_zstd1_compress": mb_s["decode/cpu"] / mb_s["zstd1_compress/cpu"],
        "decode_cpu_x_zstd1_decompress": mb_s["decode/cpu"] / mb_s["zstd1_decompress/cpu"],
    }
    return {
        "bits": bits, "coder": coder, "bytes": len(blob), "ratio_vs_raw": cur.nbytes / len(blob),
        "achieved_bits_per_element": 8 * len(blob) / cur.size,
        "entropy_bits_per_element": entropy, "p0": p0, "rel_err_u": err_u,
        "encode_s": best["encode"], "decode_s": best["decode"],
        "encode_mb_s": mb_s["encode"], "decode_mb_s": mb_s["decode"],
        "zstd1_compress_mb_s": mb_s["zstd1_compress"],
        "zstd1_decompress_mb_s": mb_s["zstd1_decompress"], "zstd1_ratio": zstd_ratio,
        "encode_x_zstd1_compress": mb_s["encode"] / mb_s["zstd1_compress"],
        "decode_x_zstd1_compress": mb_s["decode"] / mb_s["zstd1_compress"],
        "decode_x_zstd1_decompress": mb_s["decode"] / mb_s["zstd1_decompress"],
        "encode_cpu_s": best["encode/cpu"], "decode_cpu_s": best["decode/cpu"],
        "zstd1_compress_cpu_s": best["zstd1_compress/cpu"],
        "zstd1_decompress_cpu_s": best["zstd1_decompress/cpu"], **cpu_ratios,
        "encode_peak_x_tracemalloc": enc_traced / cur.nbytes,
        "decode_peak_x_tracemalloc": dec_traced / cur.nbytes,
        "encode_peak_x_rss": enc_rss / cur.nbytes, "decode_peak_x_rss": dec_rss / cur.nbytes,
        "decode_matches_encode": matches,
    }


def bench_synthetic(codec: ModuleType, config: BenchConfig) -> dict[str, Any]:
    """All (b, coder) cases on one synthetic tensor, each timed against zstd-1 alongside."""
    ref, cur = make_synthetic(config.elements)
    cases = [
        bench_synthetic_case(codec, ref, cur, bits=bits, coder=coder, repeats=config.repeats)
        for bits in config.bits
        for coder in config.coders
    ]
    lossless_bytes = len(codec.encode_exact(cur))
    for case in cases:
        case["ratio_vs_lossless"] = lossless_bytes / case["bytes"]
    return {
        "elements": config.elements,
        "lossless_ratio_vs_raw": cur.nbytes / lossless_bytes, "results": cases,
    }


def profile_codec(codec: ModuleType, elements: int, bits: int, coder: str) -> str:
    """cProfile of one encode and one decode: which stage (delta, keys, stats, packing, zstd,
    reconstruction, ...) costs what.

    cProfile sees only the calling thread, so the codec's chunk pool is pinned to one thread
    for the duration (``chunks.MAX_THREADS``, when the codec has it): the shares are those
    of single-threaded work, which is what the pool divides among cores. Times are the
    thread's CPU seconds, so other jobs on the machine do not distort the shares.
    """
    ref, cur = make_synthetic(elements)
    blob = codec.encode_delta(cur, ref, bits=bits, coder=coder)[0]
    text = io.StringIO()
    pool = getattr(codec, "chunks", None)
    saved = getattr(pool, "MAX_THREADS", None)
    if saved is not None:
        pool.MAX_THREADS = 1  # type: ignore[union-attr]
    try:
        for label, call in (
            ("encode", lambda: codec.encode_delta(cur, ref, bits=bits, coder=coder)),
            ("decode", lambda: codec.decode_delta(blob, ref)),
        ):
            profiler = cProfile.Profile(time.thread_time)  # CPU time: immune to other jobs
            profiler.runcall(call)
            text.write(f"--- {label} (b={bits}, coder={coder}, {elements} elements, "
                       f"{'1 thread' if saved is not None else 'codec threads unpinned'})\n")
            pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(14)
    finally:
        if saved is not None:
            pool.MAX_THREADS = saved  # type: ignore[union-attr]
    return text.getvalue()


# ----------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--elements", type=int, default=None,
                        help="synthetic tensor size (default 100000000; 200000 with --quick)")
    parser.add_argument("--repeats", type=int, default=None, help="timing runs, best kept")
    parser.add_argument("--out", type=Path, default=Path("bench/out/codec.json"))
    parser.add_argument("--readme", type=Path, default=None,
                        help="README to update (default bench/README.md, none with --quick)")
    parser.add_argument("--profile", action="store_true",
                        help="also cProfile one encode/decode (default coder) per b")
    return parser.parse_args(argv)


def make_config(args: argparse.Namespace) -> BenchConfig:
    quick = bool(args.quick)
    return BenchConfig(
        quick=quick,
        elements=args.elements or (200_000 if quick else 100_000_000),
        repeats=args.repeats or (1 if quick else 5),
        bits=(2, 3, 4), coders=("zstd", "huffman"),
        digits_width=8 if quick else 16,
        digits_snapshots=3 if quick else 10,
        digits_every_steps=5 if quick else 20,
        profile=bool(args.profile),
    )


def run(config: BenchConfig, command: str) -> dict[str, Any]:
    """Runs every workload; returns the JSON-ready report."""
    from ckptd.daemon import codec
    from ckptd.daemon.config import EngineConfig

    params = inspect.signature(codec.encode_delta).parameters
    default_coder = params["coder"].default
    min_lossy = EngineConfig().min_lossy_elements
    report: dict[str, Any] = {"meta": {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(), "command": command, "config": asdict(config),
        "default_coder": default_coder, "representative": params["representative"].default,
        "min_lossy_elements": min_lossy, "loadavg_1m_at_start": os.getloadavg()[0],
        "timing": f"best of {config.repeats} wall-clock rounds (time.perf_counter); each "
                  "round runs zstd-1 compress, encode, zstd-1 decompress, decode in turn",
        "memory": "tracemalloc peak during the call incl. outputs (primary); "
                  "RSS high-water mark sampled every 1 ms by a thread (cross-check)",
    }}
    report["digits"] = bench_digits(codec, config, min_lossy)
    report["synthetic"] = bench_synthetic(codec, config)
    report["targets"] = evaluate_targets(report, default_coder)
    report["meta"]["loadavg_1m_at_end"] = os.getloadavg()[0]
    if config.profile:
        report["profile"] = "".join(profile_codec(codec, min(config.elements, 20_000_000), bits,
                                                  default_coder) for bits in config.bits)
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = make_config(args)
    command = "python bench/codec.py " + " ".join(sys.argv[1:] if argv is None else argv)
    report = run(config, command.strip())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    summary = summary_markdown(report)
    print(summary)
    if "profile" in report:
        print(report["profile"])
    readme = args.readme or (None if config.quick else Path("bench/README.md"))
    if readme is not None:
        update_readme(readme, summary + "\n" + COLUMNS_NOTE)
    print(f"wrote {args.out}" + (f" and {readme}" if readme else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
