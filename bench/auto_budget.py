"""Evidence for a state-relative error budget of ``bits="auto"`` (issue 16).

The shipped adaptive width keeps, per tensor and save, the smallest b whose dropped buckets
hold at most a share of *the delta's* L2 norm; that rule is scale-free in the delta, so a
tiny change between frequent saves keeps as many buckets as a large one between sparse
saves. ``EngineConfig.auto_bits_relative_to="state"`` makes the budget a share of *the
tensor's* norm instead (the log domain: an RMS relative error of the state). This runs
chosen settings of the recovery sweep with it, through the same harness
(``bench.recovery.run_plan``, ``bench.recovery_ckptd.run_setting``: the real daemon and
client, the same failures and rework protocol), and compares them with the sweep's own
rows (``bench/out/recovery-full.json``: b3, auto0.2...).

Usage (from the repository root; run it niced, the rework is counted in steps)::

    nice -n 19 python -m bench.auto_budget --budgets 0.003 0.01 --sizes-only   # widths only
    nice -n 19 python -m bench.auto_budget --budgets 0.003 0.01                # + rework
    nice -n 19 python -m bench.auto_budget --workloads lm --intervals 50 --budgets \
        --bits 4 exact --failures 18     # the sweep's own rows, with 3x lm's failures
    python -m bench.auto_budget --report-only bench/out/auto-budget.json
    python -m bench.auto_budget --report-only seed0.json seed1.json   # pooled over seeds
    python -m bench.auto_budget --report-only a.json b.json --per-failure \
        --tolerances 0 0.001     # each failure side by side; targets loosened by 0.1 %

Writes the JSON (``--out``, default ``bench/out/auto-budget.json``) and a Markdown summary
beside it (``.md``).
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from bench.recovery import Plan, full_plan, grid_settings, run_plan
from bench.recovery_analysis import HISTORY_CHECKPOINTS, summarize
from bench.recovery_ckptd import Setting
from bench.recovery_protocol import ema, first_reached

_BENCH = Path(__file__).resolve().parent
_BASELINE = _BENCH / "out" / "recovery-full.json"
# The sweep's rows the state-relative budgets are compared with, per K.
# ``recovery_ckptd._breakdown``'s element counts per width: overall and per tensor group.
_WIDTH_KEY = re.compile(r"(?:(.+)_)?bits(\d+)_elements")
_BASELINE_SETTINGS = ("b2", "b3", "b4", "auto0.2", "auto0.3")


def state_settings(budgets: list[float], intervals: list[int], min_lossy: list[int],
                   optims: list[str], measure_rework: bool) -> list[Setting]:
    """``state<budget>-K<k>[-minlossy1][-optim-fixed3]``: the adaptive width with a
    state-relative budget, every other knob at the sweep's centre."""
    return [Setting(f"state{budget:g}-K{k}" + ("" if m == 1024 else f"-minlossy{m}")
                    + ("" if optim == "sq-log" else f"-optim-{optim.replace(':', '')}"),
                    "auto_budget", k, f"auto:{budget}", min_lossy_elements=m,
                    auto_relative_to="state", optim=optim, measure_rework=measure_rework)
            for budget in budgets for k in intervals for m in min_lossy for optim in optims]


def fine_settings(specs: list[str], intervals: list[int], min_lossy: list[int],
                  optims: list[str], measure_rework: bool) -> list[Setting]:
    """``fine<P>-b<B>-K<k>[-minlossy1][-optim-fixed2]`` for each ``B:P`` of ``specs``: the
    weights (the tensors under the daemon's AUTO policy) at width B (``auto`` or
    ``auto<eps>``, e.g. ``auto0.005``: the adaptive width, state-relative budget eps) with P
    buckets per octave
    (``EngineConfig.buckets_per_octave``); the optimizer state by ``optims``."""
    out = []
    for spec in specs:
        width, _, per_octave = spec.partition(":")
        bits: int | str = int(width) if width.isdigit() else f"auto:{width[4:]}"
        for k in intervals:
            for m in min_lossy:
                for optim in optims:
                    out.append(Setting(
                        f"fine{per_octave}-b{width}-K{k}" + ("" if m == 1024 else
                                                             f"-minlossy{m}")
                        + ("" if optim == "sq-log" else f"-optim-{optim.replace(':', '')}"),
                        "auto_budget", k, bits, min_lossy_elements=m,
                        auto_relative_to="state", optim=optim,
                        measure_rework=measure_rework, buckets_per_octave=int(per_octave)))
    return out


def fixed_settings(bits: list[str], intervals: list[int], measure_rework: bool,
                   optim: str = "sq-log", min_lossy: int = 1024) -> list[Setting]:
    """The sweep's own fixed-width rows (``b4-K50``...) and, for ``exact``, its lossless
    baseline (its rework measured at every K here): to re-run them under this command's
    failures beside the state-relative ones. ``optim`` other than the sweep's ``sq-log``
    gives the lossy rows' optimizer state that policy (``b3-K50-optim-fixed2-sq3``);
    ``min_lossy`` other than the sweep's 1024 their ``min_lossy_elements``
    (``b3-K50-optim-fixed2-sq3-minlossy1``: small tensors lossy, as the state-relative rows
    measure them)."""
    widths = tuple(int(b) for b in bits if b != "exact")
    out = []
    for s in grid_settings(widths, tuple(intervals)):
        if s.bits is None:
            if "exact" in bits:
                out.append(replace(s, measure_rework=measure_rework))
            continue
        name = (s.name + ("" if optim == "sq-log" else f"-optim-{optim.replace(':', '')}")
                + ("" if min_lossy == 1024 else f"-minlossy{min_lossy}"))
        out.append(replace(s, name=name, measure_rework=measure_rework,
                           optim=optim, min_lossy_elements=min_lossy))
    return out


def make_plan(args: argparse.Namespace) -> Plan:
    """The sweep's plan (steps, failures per seed...) cut to the chosen workloads, seeds and
    settings; ``--failures`` replaces the failures per seed of every chosen workload and
    ``--steps`` its run length (a 400-step run at K=50 has 8 checkpoints: 2000 steps give the
    40 that the history line counts)."""
    plan = full_plan()
    failures = dict(plan.failures_per_seed)
    if args.failures is not None:
        failures.update({name: args.failures for name in args.workloads})
    steps = dict(plan.steps)
    if args.steps is not None:
        steps.update({name: args.steps for name in args.workloads})
    settings = (fixed_settings(args.bits, args.intervals, not args.sizes_only,
                               args.bits_optim, args.bits_min_lossy)
                + state_settings(args.budgets, args.intervals, args.min_lossy, args.optim,
                                 not args.sizes_only)
                + fine_settings(args.fine, args.intervals, args.min_lossy, args.optim,
                                not args.sizes_only))
    return replace(plan, mode="auto-budget", workloads=tuple(args.workloads),
                   seeds=tuple(args.seeds), only={}, seed_count={}, confirm_defaults=False,
                   failures_per_seed=failures, steps=steps, settings=tuple(settings),
                   out_dir=args.out.parent, json_path=args.out)


def clustered_2se(items: list[dict[str, Any]]) -> float | None:
    """Two standard errors of the rework ratio with the failures grouped by the checkpoint
    they restore (seed, step): failures after one checkpoint share its restored state, so
    they are not independent, and more failures per checkpoint narrow the plain 2se more
    than the evidence. Cluster-robust (sandwich) variance of the mean rework difference;
    None with fewer than two checkpoints."""
    resumes = [(item["seed"], r) for item in items for r in item["resumes"]]
    clusters: dict[tuple[int, int], list[int]] = {}
    for seed, r in resumes:
        clusters.setdefault((seed, r["restore_step"]), []).append(r["rework"] - r["exact_rework"])
    if len(clusters) < 2:
        return None
    n = len(resumes)
    mean = sum(sum(d) for d in clusters.values()) / n
    exact_mean = sum(r["exact_rework"] for _, r in resumes) / n
    spread = sum(sum(x - mean for x in d) ** 2 for d in clusters.values())
    variance = spread / n**2 * len(clusters) / (len(clusters) - 1)
    return 2 * variance**0.5 / exact_mean


def _widths(row_items: list[dict[str, Any]]) -> str:
    """Mean bits per lossy element of the last delta, per tensor group (``all`` where the
    results predate the groups), over the seeds."""
    totals: dict[str, list[int]] = {}
    for item in row_items:
        breakdown = item["delta_breakdown"]
        found = [(m.group(1) or "all", int(m.group(2)), count) for key, count in
                 breakdown.items() if (m := _WIDTH_KEY.fullmatch(key))]
        grouped = any(group != "all" for group, _, _ in found)
        for group, bits, count in found:
            if (group == "all") != grouped:  # the overall count where groups exist
                acc = totals.setdefault(group, [0, 0])
                acc[0] += bits * count
                acc[1] += count
    return ", ".join(f"{g} {s / n:.1f}" for g, (s, n) in sorted(totals.items()) if n)


def _line(row: dict[str, Any], items: list[dict[str, Any]], sweep: bool) -> str:
    clustered = clustered_2se(items) if row["rework_ratio"] is not None else None
    rework = ("-" if row["rework_ratio"] is None else
              f"{row['rework_ratio']:.2f} +/- {row['rework_ratio_2se']:.2f}"
              + ("" if clustered is None else f" ({clustered:.2f})"))
    lost = ("-" if row["rework_ratio"] is None else
            f"{row['diverged']}/{row['censored']} of {row['failures']}")
    widths = _widths(items)
    # Fewer checkpoints than the history line counts (a 400-step run at K=50 has 8).
    count = row["history_checkpoints"]
    kept = "" if count >= HISTORY_CHECKPOINTS else f" ({count})"
    return (f"| {row['workload']} | {row['interval']} | `{row['name']}`"
            f"{' (sweep)' if sweep else ''} | "
            f"{row['delta_ratio']:.1f}x | {row['history_ratio']:.1f}x{kept} | {rework} | "
            f"{lost} | {widths} | {_errors(row)} |")


def _errors(row: dict[str, Any]) -> str:
    """The restored state's error (median relative L2 of the weights / the optimizer state)
    and the restored Adam update direction's, per parameter group: what the issue asks the
    report to show beside the rework; ``-`` without restores."""
    if row["rework_ratio"] is None:
        return "-"
    update = ", ".join(f"{g} {e:.2f}" for g, e in row.get("update_error", {}).items())
    return (f"{row['restore_error_model']:.3f} / {row['restore_error_optim']:.2f}"
            + (f"; {update}" if update else ""))


def pooled(outputs: list[dict[str, Any]]) -> dict[str, Any]:
    """Several runs' results as one (``summarize`` pools a setting's seeds): the first
    run's provenance, the load at the last one's end, the minutes summed. A (workload,
    seed, setting) in two of them is a mistake, not more failures: refused."""
    seen = [(r["workload"], r["seed"], r["setting"]["name"])
            for output in outputs for r in output["results"]]
    if len(set(seen)) != len(seen):
        raise SystemExit("--report-only: the same workload, seed and setting in two files")
    first, last = outputs[0], outputs[-1]
    provenance = {**first.get("provenance", {}), "loadavg_1m_at_end":
                  last.get("provenance", {}).get("loadavg_1m_at_end", 0)}
    return {**first, "provenance": provenance,
            "seconds": sum(o.get("seconds", 0) for o in outputs),
            "references": [r for o in outputs for r in o["references"]],
            "results": [r for o in outputs for r in o["results"]]}


def _smoothed(output: dict[str, Any]) -> dict[tuple[str, int], list[float]]:
    """Each reference's smoothed held-out loss (the protocol's EMA), by (workload, seed)."""
    return {(ref["workload"], ref["seed"]): ema(ref["eval_loss"], ref["eval_loss"][0])
            for ref in output["references"]}


def per_failure(output: dict[str, Any], top: int = 2) -> str:
    """Each failure's rework under every setting, side by side, per workload and K: whether
    a setting's mean is decided by one or two failure points, and whether they are the same
    points for every setting (then the protocol's threshold, not one tensor group, decides).
    Cells are steps to the target (``c``: capped, ``NaN``: diverged), and where a restore
    took longer than exact, by how much it missed the target when exact reached it (the
    resumed run's smoothed loss then, relative to the target, in %: a miss by a hair means
    the threshold, not the restored state's quality, decided the steps); the last row is
    the share of a setting's excess steps over exact that its ``top`` largest failures
    carry, and exact's steps summed over the same failures (settings whose checkpoints
    differ in kind, e.g. more bases, may have different failure points)."""
    smoothed = _smoothed(output)
    columns: dict[tuple[str, int], list[str]] = {}
    cells: dict[tuple[str, int], dict[tuple[int, int, int], dict[str, str]]] = {}
    exact: dict[tuple[str, int], dict[tuple[int, int, int], int]] = {}
    excess: dict[tuple[str, int, str], list[int]] = {}
    exact_sums: dict[tuple[str, int, str], int] = {}
    for r in output["results"]:
        name, key = r["setting"]["name"], (r["workload"], r["setting"]["interval"])
        if r["setting"]["bits"] is None or not r["resumes"]:
            continue  # the exact baseline is the reference's replay: the "exact" column
        if name not in columns.setdefault(key, []):
            columns[key].append(name)
        for resume in r["resumes"]:
            point = (r["seed"], resume["restore_step"], resume["failed_at"])
            exact.setdefault(key, {})[point] = resume["exact_rework"]
            cell = ("NaN" if resume["diverged"] else
                    f"{resume['rework']}{'c' if resume['censored'] else ''}")
            if not resume["diverged"] and resume["rework"] > resume["exact_rework"]:
                resumed = ema(resume["eval_loss"][1:],
                              smoothed[(r["workload"], r["seed"])][resume["restore_step"]])
                margin = resumed[resume["exact_rework"] - 1] / resume["target"] - 1
                cell += f" (+{100 * margin:.2f}%)"
            cells.setdefault(key, {}).setdefault(point, {})[name] = cell
            excess.setdefault((*key, name), []).append(
                resume["rework"] - resume["exact_rework"])
            exact_sums[(*key, name)] = exact_sums.get((*key, name), 0) + resume["exact_rework"]
    out = []
    for key in sorted(columns):
        names = columns[key]
        falls = []  # the reference's smoothed loss, relative fall per step at the failures
        for seed, restored, failed in cells[key]:
            curve = smoothed[(key[0], seed)]
            falls.append(1 - (curve[failed] / curve[restored]) ** (1 / (failed - restored)))
        out += [f"{key[0]} K={key[1]}: " + "; ".join(f"({i}) `{n}`"
                                                     for i, n in enumerate(names, 1))
                + f". The reference's smoothed loss falls {100 * statistics.median(falls):.2f}%"
                " per step between restore and failure (median over the failures).",
                "", "| seed | restored at | failed at | exact | "
                + " | ".join(f"({i})" for i in range(1, len(names) + 1)) + " |",
                "|---:|---:|---:|---:|" + "---:|" * len(names)]
        for point in sorted(cells[key]):
            row = cells[key][point]
            out.append(f"| {point[0]} | {point[1]} | {point[2]} | {exact[key][point]} | "
                       + " | ".join(row.get(n, "-") for n in names) + " |")
        shares = []
        for n in names:
            extra = sorted(excess[(*key, n)], reverse=True)
            total = sum(extra)
            shares.append(f"{sum(extra[:top]) if total > 0 else '-'}/{total} of "
                          f"{exact_sums[(*key, n)]}")
        out += [f"| excess: top {top} / all of exact's | | | | " + " | ".join(shares) + " |",
                ""]
    return "\n".join(out)


def loosened(output: dict[str, Any], tolerances: list[float]) -> str:
    """The rework ratio with every failure's target loosened by a share (the smoothed loss
    within ``(1 + t)`` of the reference's at the failure), exact and lossy alike, per
    setting: how much of the excess is a miss by a hair at a dip of the held-out loss
    rather than a slower recovery. Computed from the stored curves (a resumed run trains
    until the strict target, so it has passed every looser one); not the protocol's
    number, a reading of it. Plain 2se."""
    smoothed = _smoothed(output)
    pairs: dict[tuple[str, int, str, float], list[tuple[int, int]]] = {}
    for r in output["results"]:
        if r["setting"]["bits"] is None:
            continue
        curve = smoothed[(r["workload"], r["seed"])]
        for resume in r["resumes"]:
            s = resume["restore_step"]
            resumed = ema(resume["eval_loss"][1:], curve[s])
            for t in tolerances:
                goal = resume["target"] * (1 + t)
                hit = first_reached(resumed, goal, start=0)
                exact = first_reached(curve, goal, start=s + 1)
                assert exact is not None  # the reference reached the strict target
                pairs.setdefault((r["workload"], r["setting"]["interval"],
                                  r["setting"]["name"], t), []).append(
                    (resume["rework"] if hit is None else hit + 1, exact - s))
    lines = ["| workload | K | setting | " + " | ".join(
        f"rework vs exact, target +{100 * t:g}%" for t in tolerances) + " |",
        "|---|---:|---|" + "---|" * len(tolerances)]
    for workload, k, name in sorted({key[:3] for key in pairs}):
        cells = []
        for t in tolerances:
            got = pairs[(workload, k, name, t)]
            exact_mean = statistics.mean(e for _, e in got)
            spread = statistics.stdev(x - e for x, e in got) if len(got) > 1 else 0.0
            cells.append(f"{statistics.mean(x for x, _ in got) / exact_mean:.2f} +/- "
                         f"{2 * spread / len(got) ** 0.5 / exact_mean:.2f}")
        lines.append(f"| {workload} | {k} | `{name}` | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def report(output: dict[str, Any], baseline: dict[str, Any] | None) -> str:
    """A Markdown table: each workload and K, the sweep's rows then the new ones."""
    rows = summarize(output)
    items: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in output["results"]:
        items.setdefault((r["workload"], r["setting"]["name"]), []).append(r)
    old: list[dict[str, Any]] = []
    old_items: dict[tuple[str, str], list[dict[str, Any]]] = {}
    if baseline is not None:
        workloads = {r["workload"] for r in rows}
        wanted = {f"{b}-K{r['interval']}" for b in _BASELINE_SETTINGS for r in rows}
        wanted |= {f"{n}-K10-minlossy1" for n in ("b4", "auto0.2")}
        old = [r for r in summarize(baseline)
               if r["workload"] in workloads and r["name"] in wanted]
        for r in baseline["results"]:
            old_items.setdefault((r["workload"], r["setting"]["name"]), []).append(r)
    lines = [
        "| workload | K | setting | delta xts | history xts | rework vs exact (+/-2se; "
        "clustered by checkpoint) | "
        "diverged/capped | mean bits of the last delta by group | restored error weights / "
        "optim; Adam update by group (medians) |",
        "|---|---:|---|---:|---:|---|---|---|---|",
    ]
    for row in sorted(old + rows, key=lambda r: (r["workload"], r["interval"],
                                                 r in rows, r["name"])):
        source = items if row in rows else old_items
        lines.append(_line(row, source[(row["workload"], row["name"])], row not in rows))
    provenance = output.get("provenance", {})
    head = (f"Measured {provenance.get('date')} at commit `{provenance.get('git_commit', '')[:7]}`"
            f", 1-min load average {provenance.get('loadavg_1m_at_start', 0):.1f} at start and "
            f"{provenance.get('loadavg_1m_at_end', 0):.1f} at end, "
            f"{output.get('seconds', 0) / 60:.1f} min. Sweep rows (first per K) from "
            f"`bench/out/recovery-full.json`.")
    return head + "\n\n" + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budgets", type=float, nargs="*", default=[0.003, 0.01],
                        help="state-relative budgets (none: only the --bits rows)")
    parser.add_argument("--bits", nargs="*", default=[], metavar="B|exact",
                        help="also the sweep's fixed-width rows (b<B>-K<k>, every other knob "
                        "at the sweep's centre) and, for exact, its lossless baseline")
    parser.add_argument("--bits-optim", default="sq-log", metavar="OPTIM",
                        help="the optimizer-state policy of the --bits rows (default: the "
                        "sweep's sq-log; e.g. fixed:2-sq3)")
    parser.add_argument("--fine", nargs="*", default=[], metavar="B:P",
                        help="finer buckets for the weights: width B (or auto<eps>) with P "
                        "buckets per octave (2 or 4), e.g. 4:2 5:4 (bench/quantizers.py)")
    parser.add_argument("--bits-min-lossy", type=int, default=1024, metavar="N",
                        help="min_lossy_elements of the --bits rows (default: the sweep's "
                        "1024; 1: small tensors lossy too)")
    parser.add_argument("--failures", type=int, metavar="N",
                        help="failures per seed of every chosen workload (default: the "
                        "sweep's, e.g. lm 6, lenet 16)")
    parser.add_argument("--steps", type=int, metavar="N",
                        help="training steps of every chosen workload (default: the sweep's, "
                        "400 for all but gpt-bf16)")
    parser.add_argument("--intervals", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--workloads", nargs="+", default=["logreg", "lenet", "lm"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--min-lossy", type=int, nargs="+", default=[1024, 1],
                        help="min_lossy_elements values (1: small tensors lossy too)")
    parser.add_argument("--optim", nargs="+", default=["sq-log"],
                        help="optimizer-state policies (Setting.optim): sq-log = the built-in "
                        "rules at the adaptive width, fixed:3 = the built-in domains at b=3, "
                        "fixed:2-sq3 = the same at b=2 with exp_avg_sq at b=3")
    parser.add_argument("--sizes-only", action="store_true",
                        help="save and measure sizes and widths, no failures (minutes less)")
    parser.add_argument("--out", type=Path, default=_BENCH / "out" / "auto-budget.json")
    parser.add_argument("--report-only", type=Path, nargs="+", metavar="JSON",
                        help="redraw the summary from saved results; several files (one "
                        "per seed, say) are pooled as one run's")
    parser.add_argument("--per-failure", action="store_true",
                        help="with --report-only: each failure's rework under every setting "
                        "side by side (which failure points decide the mean)")
    parser.add_argument("--tolerances", type=float, nargs="*", default=[], metavar="T",
                        help="with --per-failure: also the rework ratio with every target "
                        "loosened by these shares (0 = the protocol's), e.g. 0 0.001 0.002")
    args = parser.parse_args(argv)
    baseline = json.loads(_BASELINE.read_text()) if _BASELINE.is_file() else None
    if args.report_only:
        output = pooled([json.loads(path.read_text()) for path in args.report_only])
        if args.per_failure:
            print(per_failure(output))
            if args.tolerances:
                print(loosened(output, args.tolerances))
        else:
            print(report(output, baseline))
        return 0
    # As bench.recovery: bit-identical replays. Restored after, so that a caller in the same
    # process (a test) keeps its own count: a leaked 1 made the in-process half of another
    # test's training differ from its subprocess half.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        plan = make_plan(args)
        output = run_plan(plan, log=lambda line: print(line, flush=True))
    finally:
        torch.set_num_threads(threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(output))
    args.out.with_suffix(".partial.json").unlink(missing_ok=True)
    text = report(output, baseline)
    args.out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
