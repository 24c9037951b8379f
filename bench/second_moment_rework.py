"""Rework after restores with Adam's ``exp_avg_sq`` exact against lossy in the log domain.

The recovery protocol of ``bench/recovery.py`` (train a reference, fail at random points,
restore through a real daemon, resume, count the extra steps to the reference's loss) on
the small AdamW transformer ("lm"), at b=3 and b=4, K=10 and K=50, two seeds: the evidence
for the client's built-in rule for ``*exp_avg_sq``.

Usage: ``python -m bench.second_moment_rework`` (~15 min on 2 shared cores); writes
``bench/out/second-moment-rework.json`` and prints a table.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from bench.recovery import Plan, run_plan
from bench.recovery_analysis import summarize
from bench.recovery_ckptd import Setting

OUT = Path(__file__).resolve().parent / "out" / "second-moment-rework.json"


def plan() -> Plan:
    settings = [Setting("exact-K10", "exact", 10, None)]
    settings += [
        Setting(f"b{b}-K{k}-optim-{optim}", "optim", k, b, optim=optim)
        for b in (3, 4) for k in (10, 50) for optim in ("sq-exact", "sq-log")
    ]
    return Plan(
        mode="second-moment", workloads=("lm",), seeds=(0, 1), steps={"lm": 400},
        failures_per_seed={"lm": 6}, settings=tuple(settings), confirm_defaults=False,
        out_dir=OUT.parent, json_path=OUT,
    )


def table(output: dict[str, Any]) -> str:
    """Pooled over seeds by ``recovery_analysis.summarize`` (rework against an exact restore
    at the same failure points)."""
    rows = ["| setting | delta vs torch.save | rework / exact (±2 SE) | diverged | negative v |",
            "|---|---|---|---|---|"]
    for row in summarize(output):
        if row["rework_ratio"] is None:
            continue
        rows.append(
            f"| {row['name']} | {row['delta_ratio']:.1f}x | {row['rework_ratio']:.3f} "
            f"(±{row['rework_ratio_2se']:.3f}) | {row['diverged']} | "
            f"{row['negative_restores']} |"
        )
    return "\n".join(rows)


def main() -> None:
    output = run_plan(plan(), lambda line: print(line, flush=True))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(output, indent=2, default=str))
    OUT.with_suffix(".partial.json").unlink(missing_ok=True)  # run_plan's progress file
    print(table(output))
    print(f"wrote {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
