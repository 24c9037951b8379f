"""Where the log domain's bytes go on a real Adam second moment: symbols or exceptions.

At K=50 the decoder's ``exp_avg_sq`` at b=2 cost 46 MB a delta against 8 MB at b=3
(``bench/README.md``, "One per-group rule for every workload?"). The log domain stores an
element verbatim (index and value, zstd) when its reconstruction would be more than
``kernels.LOG_MAX_ERROR_OCTAVES`` off; this counts them. It runs each tensor's chain as the
daemon does (the first checkpoint exact, every later one a log-domain delta against the
previous reconstruction; every ``exp_avg_sq``, small tensors included, as the harness's
``min_lossy_elements=1``) and reports per delta and width: the blob bytes, the coded
symbols' bytes, the exceptions (count and bytes), and which exceptions fell in a *dropped*
bucket (their step restored as 0) or in a *kept* one (the bucket's representative too far
from their own step); plus the restored Adam update's relative error per parameter group
(``m`` exact: the second moment's own effect).

States: ``--states DIR`` reads ``<step>.pt`` files (``{"model": ..., "optim": ...}``, as
``bench.recovery_protocol.run_reference`` spills the decoder's); without it the workload is
trained here (``--workload gpt --seed 0 --steps 400 --every 50``: the recovery harness's
K=50 checkpoints, bit for bit, one torch thread), and ``--save-states DIR`` keeps them.

    nice -n 19 python -m bench.log_exceptions --bits 2 3 --out bench/out/log-exceptions.json
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ckptd.daemon import codec
from ckptd.daemon.codec import chunks, delta, domains, quantize

from bench.recovery_protocol import parameter_groups, update_errors
from bench.workloads import make_workload

_OCTAVE = 1 << 23  # float32 pattern steps per factor of 2


def _from_files(directory: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    for path in sorted(directory.glob("*.pt"), key=lambda p: int(p.stem)):
        yield int(path.stem), torch.load(path, weights_only=True)


def _trained(workload: str, seed: int, steps: int, every: int,
             keep: Path | None) -> Iterator[tuple[int, dict[str, Any]]]:
    trainer = make_workload(workload).trainer(seed)
    for _ in range(steps):
        trainer.train_step()
        if trainer.step % every == 0:
            state = trainer.state()
            if keep is not None:
                keep.mkdir(parents=True, exist_ok=True)
                torch.save(state, keep / f"{trainer.step}.pt")
            yield trainer.step, state


def exceptions(cur: np.ndarray, ref: np.ndarray, blob: bytes) -> dict[str, int]:
    """One log-domain blob's bytes: its coded symbols and its exceptions (count, stored
    bytes), the exceptions split by whether their bucket was dropped at the blob's width
    (restored as no change) or kept (the bucket's one representative too far from their
    step); and that width (``bits="auto"`` chooses it per tensor)."""
    parsed = delta.parse_delta(blob, ref)
    bits = parsed.header.bits
    index = parsed.index
    cur_flat, ref_flat = cur.reshape(-1), ref.reshape(-1)
    ops = domains.Ops(domains.LOG, "float32")
    stats = ops.stats(cur_flat, ref_flat, "mean")
    # A codec from before the log domain's own promotion (``--before``'s layout on
    # PYTHONPATH) has no ``Ops.plan``: priority promotion for every domain.
    plan = (ops.plan(stats, bits, "mean") if hasattr(ops, "plan")
            else quantize.make_plan(stats, bits, "mean"))
    step = (cur_flat[index].view(np.int32).astype(np.int64)
            - ref_flat[index].view(np.int32).astype(np.int64))
    keys = step.astype(np.float32).view(np.uint32) >> 23
    dropped = int(np.sum(plan.lut[keys] == 0))
    stored = len(delta._pack_exceptions(index, parsed.values, chunks.Scratch()))
    return {"exceptions": int(index.size), "exceptions_dropped_bucket": dropped,
            "exceptions_kept_bucket": int(index.size) - dropped,
            "exceptions_step_over_an_octave": int(np.sum(np.abs(step) > _OCTAVE)),
            "exception_bytes": stored, "symbol_bytes": sum(len(b) for b in parsed.bodies),
            "elements": int(cur.size), "bit_elements": bits * int(cur.size)}


def measure(states: Iterator[tuple[int, dict[str, Any]]], bits: list[int | str],
            groups: dict[int, str]) -> list[dict[str, Any]]:
    """One row per (delta checkpoint, width): every ``exp_avg_sq`` chained in the log
    domain against its previous reconstruction at that width."""
    prev: dict[tuple[int, int], np.ndarray] = {}
    rows: list[dict[str, Any]] = []
    for step, state in states:
        optim = state["optim"]["state"]
        for b in bits:
            totals: dict[str, int] = defaultdict(int)
            restored: dict[int, dict[str, torch.Tensor]] = {}
            for index, moments in optim.items():
                v = moments["exp_avg_sq"].numpy()
                ref = prev.get((b, index))
                if ref is None:  # the base: exact
                    prev[(b, index)] = v.copy()
                    continue
                blob, out = codec.encode_delta(v, ref, bits=b, domain="log")
                prev[(b, index)] = out
                totals["blob_bytes"] += len(blob)
                for key, value in exceptions(v, ref, blob).items():
                    totals[key] += value
                restored[index] = {"exp_avg": moments["exp_avg"],
                                   "exp_avg_sq": torch.from_numpy(out.copy())}
            if restored:
                rows.append({"step": step, "bits": b, **totals, "update_error": update_errors(
                    {"optim": {"state": restored}}, state, groups)})
    return rows


def summary(rows: list[dict[str, Any]]) -> str:
    lines = ["| step | b (mean) | v delta MB | symbols MB | exceptions | of the elements | "
             "exception MB | dropped / kept bucket | step > 1 octave | Adam update error "
             "by group (m exact) |", "|---:|---:|---:|---:|---:|---:|---:|---|---:|---|"]
    for r in rows:
        update = ", ".join(f"{g} {e:.2f}" for g, e in sorted(r["update_error"].items()))
        lines.append(
            f"| {r['step']} | {r['bits']}"
            + ("" if r["bits"] != "auto" else f" ({r['bit_elements'] / r['elements']:.1f})")
            + f" | {r['blob_bytes'] / 1e6:.2f} | "
            f"{r['symbol_bytes'] / 1e6:.2f} | {r['exceptions']} | "
            f"{r['exceptions'] / r['elements']:.2%} | {r['exception_bytes'] / 1e6:.2f} | "
            f"{r['exceptions_dropped_bucket']} / {r['exceptions_kept_bucket']} | "
            f"{r['exceptions_step_over_an_octave']} | {update} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workload", default="gpt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--every", type=int, default=50, help="K: steps between checkpoints")
    parser.add_argument("--bits", nargs="+", default=["2", "3"], metavar="B|auto",
                        help="widths (auto: the codec's adaptive width, its default budget)")
    parser.add_argument("--states", type=Path, help="read <step>.pt states instead of training")
    parser.add_argument("--save-states", type=Path, help="keep the trained states here")
    parser.add_argument("--out", type=Path, default=Path("bench/out/log-exceptions.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    groups = parameter_groups(make_workload(args.workload).trainer(args.seed))
    states = (_from_files(args.states) if args.states else
              _trained(args.workload, args.seed, args.steps, args.every, args.save_states))
    rows = measure(states, [b if b == "auto" else int(b) for b in args.bits], groups)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                    "rows": rows}, indent=1))
    text = summary(rows)
    args.out.with_suffix(".md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
