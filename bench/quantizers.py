"""Rate-distortion of the weights' quantizer on real training deltas (issue 16, lm's rework).

The LC codec's buckets are octaves (key = sign + exponent, ``bits >> 23``): each kept element
decodes to its bucket's mean, up to ~1/3 off whatever the width, so more bits stop buying
accuracy above b=4. This compares, on the weights of the small AdamW transformer (``lm``)
between two checkpoints ``K`` steps apart, three quantizers of the same delta, each coded by
the codec's own symbol coder (zstd, adaptive layout) and counted with its representatives,
exceptions and chunk table:

* ``1/octave`` b=2..5: today's codec (``encode_delta``), the blob's own size; and
  ``bits="auto"`` with a state-relative budget eps (``auto_relative_to="state"``).
* ``2/octave``, ``4/octave``: the same with finer keys (``buckets_per_octave``: sign +
  exponent + top 1 or 2 mantissa bits, ``bits >> 22`` / ``>> 21``), priority promotion of the
  largest keys, mean representatives.
* ``uniform`` q, b: symbol = round(delta / q) clipped to the 2^b - 2 non-zero levels (a dead
  zone of |delta| < q/2 becomes symbol 0), each level's mean as its value; elements beyond the
  top level go to the nearest level (``clip``) or are stored verbatim (``exc``). q is set from
  a state-relative budget eps: ``q = 2 eps ||w|| / sqrt(n)`` bounds the restored error by eps
  when nothing is clipped (every element within q/2 of its cell's centre, and the mean is at
  least as close in L2).

Distortion: the restored weights' relative L2 error against the tensor, ``||w~ - w|| / ||w||``
over all weights together (state-relative, what the recovery harness reports). The reference
is the previous checkpoint's exact value (not a chain of reconstructions): the comparison is
of quantizers on one delta.

Usage: ``python -m bench.quantizers [--quick]``; writes ``bench/out/quantizers.json`` and a
Markdown summary beside it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ckptd.daemon import codec
from ckptd.daemon.codec import chunks, layouts

from bench.workloads import make_workload

_OUT = Path(__file__).resolve().parent / "out" / "quantizers.json"
_HEADER_BYTES = 44 + 8 * 2 + 5  # header (2-d shape), coder parameter length + byte


def checkpoints(steps: list[int], seed: int) -> dict[int, dict[str, np.ndarray]]:
    """The lm weights (float32 model tensors) after each of ``steps`` steps of one run."""
    trainer = make_workload("lm").trainer(seed)
    wanted = sorted(steps)
    out: dict[int, dict[str, np.ndarray]] = {}
    while trainer.step < wanted[-1]:
        trainer.train_step()
        if trainer.step in wanted:
            out[trainer.step] = {k: v.detach().numpy().astype(np.float32).copy()
                                 for k, v in trainer.model.state_dict().items()
                                 if v.is_floating_point()}
    return out


def _coded_bytes(symbols: np.ndarray, bits: int) -> int:
    scratch = chunks.Scratch()
    parts = chunks.bounds(symbols.size, chunks.CHUNK_ELEMS)
    return sum(4 + len(layouts.encode_adaptive(symbols[p], bits, scratch)) for p in parts)


def _exception_bytes(index: np.ndarray, values: np.ndarray) -> int:
    if index.size == 0:
        return 16
    return 16 + len(codec.entropy.zstd_compress(index.astype("<u8").tobytes()
                                                + values.tobytes(), chunks.Scratch()))


def lc(cur: np.ndarray, ref: np.ndarray, bits: int | str, buckets_per_octave: int,
       eps: float) -> tuple[int, np.ndarray]:
    """The codec's exponent buckets (``buckets_per_octave`` per octave), the blob's own size;
    ``bits="auto"`` with a state-relative budget ``eps``."""
    blob, rec = codec.encode_delta(cur, ref, bits=bits, buckets_per_octave=buckets_per_octave,
                                   auto_max_error=eps, auto_relative_to="state")
    return len(blob), rec


def uniform(cur: np.ndarray, ref: np.ndarray, bits: int, q: float,
            outliers: str) -> tuple[int, np.ndarray]:
    """round(delta / q) on 2^b - 2 non-zero levels; beyond the top: clip or exceptions."""
    delta = (cur - ref).reshape(-1)
    top = (1 << (bits - 1)) - 1
    level = np.rint(delta.astype(np.float64) / q).astype(np.int64)
    beyond = np.abs(level) > top
    level = np.clip(level, -top, top)
    symbols = np.where(level > 0, 2 * level - 1, -2 * level).astype(np.uint8)
    if outliers == "exc":
        symbols[beyond] = 0
    sums = np.bincount(symbols, weights=np.where(beyond & (outliers == "exc"), 0.0, delta),
                       minlength=1 << bits)
    counts = np.bincount(symbols, minlength=1 << bits)
    reps = np.where(counts > 0, sums / np.maximum(counts, 1), 0.0).astype(np.float32)
    reps[0] = -0.0
    rec = (ref.reshape(-1) + reps[symbols]).astype(np.float32)
    index = np.flatnonzero(beyond) if outliers == "exc" else np.zeros(0, np.int64)
    rec[index] = cur.reshape(-1)[index]
    size = (_HEADER_BYTES + 4 * ((1 << bits) - 1) + _coded_bytes(symbols, bits)
            + _exception_bytes(index, cur.reshape(-1)[index]))
    return size, rec.reshape(cur.shape)


def measure(pair: tuple[dict[str, np.ndarray], dict[str, np.ndarray]],
            configs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Bytes per element and restored relative L2 error of each config over all weights."""
    before, after = pair
    n = sum(v.size for v in after.values())
    norm = math.sqrt(sum(float(np.dot(v.ravel(), v.ravel())) for v in after.values()))
    rows = []
    for config in configs:
        size = 0
        err = 0.0
        for name, cur in after.items():
            ref = before[name]
            kind = config["kind"]
            if kind == "lc":
                nbytes, rec = lc(cur, ref, config["bits"], config["per_octave"],
                                 config.get("eps", 0.0))
            else:
                q = 2 * config["eps"] * math.sqrt(float(np.dot(cur.ravel(), cur.ravel()))
                                                  / cur.size)
                nbytes, rec = uniform(cur, ref, config["bits"], max(q, 1e-30),
                                      config["outliers"])
            size += nbytes
            diff = (rec.astype(np.float64) - cur).ravel()
            err += float(np.dot(diff, diff))
        rows.append({**config, "bytes_per_element": size / n, "bits_per_element": 8 * size / n,
                     "relative_l2": math.sqrt(err) / norm})
    return rows


def all_configs(quick: bool) -> list[dict[str, Any]]:
    widths = [2, 3, 4] if quick else [2, 3, 4, 5]
    uniform_widths = [3, 5] if quick else [3, 4, 5, 6, 7]
    epss = [0.01, 0.03] if quick else [0.005, 0.01, 0.02, 0.03, 0.05]
    configs: list[dict[str, Any]] = [{"kind": "lc", "bits": b, "per_octave": p}
                                     for p in (1, 2, 4) for b in widths]
    configs += [{"kind": "lc", "bits": "auto", "per_octave": 1, "eps": e}
                for e in ([0.03] if quick else [0.01, 0.02, 0.03])]
    configs += [{"kind": "lc", "bits": "auto", "per_octave": p, "eps": e}
                for p in (2, 4) for e in ([0.005] if quick else [0.003, 0.004, 0.005, 0.007])]
    configs += [{"kind": "uniform", "bits": b, "eps": e, "outliers": o}
                for o in ("clip", "exc") for b in uniform_widths for e in epss]
    return configs


def summary(output: dict[str, Any]) -> str:
    lines = [f"Measured {output['date']}, 1-min load {output['load_start']:.1f} / "
             f"{output['load_end']:.1f}, {output['seconds']:.0f} s. lm seed "
             f"{output['seed']}, weights between step t and t + K; bits/element after the "
             "codec's zstd coder (all bytes) / restored relative L2 of the weights.", ""]
    for case in output["cases"]:
        lines += [f"**t={case['t']}, K={case['K']}** ({case['elements']} elements)", "",
                  "| quantizer | bits/elem | rel. L2 |", "|---|---:|---:|"]
        for r in sorted(case["rows"], key=lambda r: r["relative_l2"]):
            label = (f"uniform-{r.get('outliers')} b{r['bits']} eps {r.get('eps')}"
                     if r["kind"] == "uniform" else
                     f"{r['per_octave']}/octave b{r['bits']}"
                     + (f" state eps {r['eps']}" if r["bits"] == "auto" else ""))
            lines.append(f"| {label} | {r['bits_per_element']:.2f} | "
                         f"{r['relative_l2']:.4f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one pair, few configs (a test)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=_OUT)
    args = parser.parse_args(argv)
    start, load_start = time.time(), os.getloadavg()[0]
    torch.set_num_threads(1)
    pairs = [(40, 10)] if args.quick else [(150, 10), (300, 10), (150, 50), (300, 50)]
    states = checkpoints(sorted({s for t, k in pairs for s in (t, t + k)}), args.seed)
    configs = all_configs(args.quick)
    cases = [{"t": t, "K": k, "elements": sum(v.size for v in states[t].values()),
              "rows": measure((states[t], states[t + k]), configs)} for t, k in pairs]
    output = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "seed": args.seed,
              "load_start": load_start, "load_end": os.getloadavg()[0],
              "seconds": time.time() - start, "cases": cases}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(output, indent=1))
    text = summary(output)
    args.out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
