"""Recovery benchmark: LC-Checkpoint's compression against the rework a restore costs.

Reproduces the paper's evidence with ckptd's real daemon and client: a run is trained,
checkpointed every K steps (weights and optimizer state), fails between two checkpoints,
restores the latest one and continues; the *rework cost* is how many steps it needs to get
back to the loss it had at the failure (``bench/recovery_protocol.py`` fixes the loss and
threshold). Sizes are compared with ``torch.save`` files of the same checkpoints, rework
with a lossless checkpoint and a restart from scratch.

Usage (from the repository root)::

    python -m bench.recovery --full     # the whole sweep -> bench/RESULTS.md, bench/plots/
    python -m bench.recovery --quick    # a smoke-sized sweep -> bench/out/quick/
    python -m bench.recovery --report-only bench/out/recovery-full.json
    python -m bench.recovery --centre gpt --seeds 0 --intervals 10   # shipped defaults only

The sweep's centre is what a user gets with no settings (the client's per-optimizer
built-in rules, ``EngineConfig()``), and it is pruned one factor at a time from there: one
width for every tensor (b=2-4, the adaptive ``bits="auto"``), the weights alone, the
optimizer state alone, the daemon's buckets per octave; then the rule's pick confirmed on
its own where it differs; the 22M-parameter decoder (``gpt``, ``gpt-bf16``) runs only the
shipped defaults (it costs ~0.5 s a step on one CPU thread).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from bench.recovery_analysis import DECODERS, LEGACY, choose_defaults, matching_rows, summarize
from bench.recovery_ckptd import Setting, run_setting
from bench.recovery_protocol import Reference, run_reference
from bench.recovery_report import write_report
from bench.workloads import Workload, make_workload

_BENCH = Path(__file__).resolve().parent
# The workloads whose tensors are all under the daemon's AUTO threshold (1024 elements):
# their tensors are made lossy by policy, or the sweep would only measure exact storage.
_FORCE_LOSSY = frozenset({"logreg"})


@dataclass(frozen=True)
class Plan:
    """What one invocation runs."""

    mode: str
    workloads: tuple[str, ...]
    seeds: tuple[int, ...]
    steps: dict[str, int]
    failures_per_seed: dict[str, int]
    settings: tuple[Setting, ...]
    confirm_defaults: bool
    out_dir: Path
    json_path: Path
    meta: dict[str, Any] = field(default_factory=dict)
    # Workloads that run only some settings, by name (``"name@0"``: with seed 0 only), and
    # only their first n seeds.
    only: dict[str, tuple[str, ...]] = field(default_factory=dict)
    seed_count: dict[str, int] = field(default_factory=dict)

    def settings_of(self, workload: str, seed: int) -> tuple[Setting, ...]:
        names = self.only.get(workload)
        if names is None:
            return self.settings
        allowed = {n.partition("@")[0] for n in names
                   if not n.partition("@")[2] or int(n.partition("@")[2]) == seed}
        return tuple(s for s in self.settings if s.name in allowed)

    def seeds_of(self, workload: str) -> tuple[int, ...]:
        return self.seeds[: self.seed_count.get(workload, len(self.seeds))]


def grid_settings(bits: tuple[int | str, ...], intervals: tuple[int, ...]) -> list[Setting]:
    """The exact baseline and every (b, K) pair, all other knobs at the sweep's centre."""
    out = []
    for k in intervals:
        # Exact restores replay the reference (rework read off its curve); resuming from the
        # smallest K's exact chain checks that replay, through the daemon.
        out.append(Setting(f"exact-K{k}", "exact", k, None, measure_rework=k == min(intervals)))
        out.extend(Setting(f"{_bits_label(b)}-K{k}", "grid", k, b) for b in bits)
    return out


def _bits_label(bits: int | str) -> str:
    """``b4`` for a fixed width, ``auto0.05`` for the adaptive one at that budget,
    ``shipped`` for the shipped defaults."""
    return f"b{bits}" if isinstance(bits, int) else str(bits).replace(":", "")


def variation_settings(intervals: tuple[int, ...] = (10, 50)) -> list[Setting]:
    """One knob at a time around the shipped defaults, at every K: the weights alone at a
    fixed octave width (``("model/*", "lossy:<b>")``, ahead of the built-in rules), the
    optimizer state at one width in the built-in domains (Adam ships ``exp_avg`` b2 and
    ``exp_avg_sq`` b3, SGD's momentum b2), and the daemon's weights at octave buckets."""
    out = []
    for k in intervals:
        out += [Setting(f"shipped-K{k}-weights-b{b}", "weights", k, SHIPPED, weights=f"lossy:{b}")
                for b in (2, 3, 4)]
        out += [Setting(f"shipped-K{k}-optim-fixed{b}", "optim", k, SHIPPED, optim=f"fixed:{b}")
                for b in (3, 4)]
        out.append(Setting(f"shipped-K{k}-buckets1", "buckets", k, SHIPPED, buckets_per_octave=1))
    return out


# The sweep's centre: what a user gets with no settings (``Checkpointer`` without ``bits=``
# or policies, ``EngineConfig()``: the client's per-optimizer built-in rules decide).
SHIPPED = "shipped"
# The adaptive width's error budgets the sweep measures (relative L2 error of the dropped
# part of a delta).
AUTO_BUDGETS = ("auto:0.2",)
# The decoder runs the shipped defaults at both K with both seeds (sized to finish in about
# an hour on 2 shared cores).
_DECODER_SETTINGS = ("shipped-K10", "shipped-K50")
# The small transformer skips what the digits models already rule out or that costs its
# K=50 restores the most (b=2, the weights at b2).
_LM_SETTINGS = ("exact-K10", "exact-K50", "shipped-K10", "shipped-K50", "b3-K10", "b3-K50",
                "b4-K10", "b4-K50", "auto0.2-K10", "auto0.2-K50",
                "shipped-K10-weights-b4", "shipped-K50-weights-b4",
                "shipped-K10-optim-fixed3", "shipped-K50-optim-fixed3")


def full_plan() -> Plan:
    return Plan(
        mode="full",
        workloads=("logreg", "lenet", "lm", "gpt", "gpt-bf16"),
        seeds=(0, 1),
        steps={"logreg": 400, "lenet": 400, "lm": 400, "gpt": 400, "gpt-bf16": 150},
        # Resuming the digits models costs milliseconds a step: more failures, less noise.
        # An LM setting with 6 failures takes 30-40 s at K=10 on 2 cores shared with a
        # load of ~10, more at K=50 when restores run to the cap. The decoder costs
        # ~0.7-1 s a step (train + held-out eval) and ~3.5 s a save there: 3 failures per
        # seed, the shipped defaults only, the bf16-autocast variant with one seed at K=10.
        failures_per_seed={"logreg": 12, "lenet": 16, "lm": 6, "gpt": 3, "gpt-bf16": 2},
        settings=tuple(grid_settings((SHIPPED, 2, 3, 4, *AUTO_BUDGETS), (10, 50))
                       + variation_settings()),
        confirm_defaults=True,
        out_dir=_BENCH,
        json_path=_BENCH / "out" / "recovery-full.json",
        only={"lm": _LM_SETTINGS, "gpt": _DECODER_SETTINGS, "gpt-bf16": ("shipped-K10",)},
        seed_count={"gpt-bf16": 1},
    )


def centre_plan(workloads: tuple[str, ...], seeds: tuple[int, ...], intervals: tuple[int, ...],
                failures: int | None, out_dir: Path) -> Plan:
    """The shipped defaults alone (and exact, for the rework baseline) on the workloads
    named: a check of what a user gets, without the sweep. ``failures`` None: sizes only."""
    full = full_plan()
    settings = [s for s in grid_settings((SHIPPED,), intervals)
                if failures is not None or s.group != "exact"]
    if failures is None:
        settings = [replace(s, measure_rework=False) for s in settings]
    return Plan(
        mode="centre", workloads=workloads, seeds=seeds,
        steps={w: full.steps[w] for w in workloads},
        failures_per_seed={w: failures or 0 for w in workloads},
        settings=tuple(settings), confirm_defaults=False, out_dir=out_dir,
        json_path=out_dir / "recovery-centre.json",
    )


def quick_plan(out_dir: Path) -> Plan:
    """Small enough for the test suite: one workload, one seed, K=10, the shipped defaults
    against exact, and one size-only base-interval variation so every kind of plot is
    drawn."""
    return Plan(
        mode="quick",
        workloads=("lenet",),
        seeds=(0,),
        steps={"lenet": 200},
        failures_per_seed={"lenet": 3},
        settings=(*grid_settings((SHIPPED,), (10,)),
                  Setting("shipped-K10-base5", "base_interval", 10, SHIPPED, base_interval=5,
                          measure_rework=False)),
        confirm_defaults=False,
        out_dir=out_dir,
        json_path=out_dir / "recovery-quick.json",
    )


def run_plan(plan: Plan, log: Callable[[str], None],
             earlier: dict[str, Any] | None = None) -> dict[str, Any]:
    """Runs every (workload, seed, setting) of ``plan``; returns the JSON-ready results.

    The reference runs stay in memory (the decoder's on disk) until the chosen defaults
    have been confirmed, so nothing is trained twice. ``earlier`` (a partial result file of
    an interrupted run): a (workload, seed) whose every setting it holds, unchanged, is
    taken from it instead of being run again (its reference is retrained, the same bits)."""
    started = time.perf_counter()
    provenance = _provenance()
    references: list[tuple[Workload, Reference]] = []
    results: list[dict[str, Any]] = []
    reused: list[str] = []
    with tempfile.TemporaryDirectory(prefix="ckptd-recovery-") as scratch:
        for name in plan.workloads:
            workload = make_workload(name)
            for seed in plan.seeds_of(name):
                reference = run_reference(workload, seed, plan.steps[name],
                                          _snapshot_every(plan), spill_dir=scratch)
                log(f"{name} seed {seed}: reference {reference.steps} steps in "
                    f"{reference.train_seconds:.1f} s, final loss {reference.eval_loss[-1]:.4f}")
                references.append((workload, reference))
                settings = plan.settings_of(name, seed)
                kept = _earlier_results(earlier, name, seed, settings)
                if kept is not None:
                    log(f"  {name} seed {seed}: {len(kept)} settings taken from the earlier run")
                    reused.append(f"{name} seed {seed}")
                    results += kept
                else:
                    results += [_run_one(plan, workload, reference, setting,
                                         scratch=Path(scratch), log=log)
                                for setting in settings]
                _save_partial(plan, references, results)
        output: dict[str, Any] = {"mode": plan.mode, "plan": _plan_summary(plan),
                  "references": [reference.summary() for _, reference in references],
                  "results": results}
        if plan.confirm_defaults:
            chosen = choose_defaults(output)
            output["confirmation"] = chosen
            extra = _confirmation_settings(plan, output, chosen)
            if extra:
                log(f"confirming chosen defaults {chosen['label']}")
            for workload, reference in references:
                results += [_run_one(plan, workload, reference, setting, scratch=Path(scratch),
                                     log=log) for setting, names in extra
                            if workload.name in names]
    output["seconds"] = time.perf_counter() - started
    output["provenance"] = {**provenance, "loadavg_1m_at_end": os.getloadavg()[0]}
    if reused:
        output["provenance"]["reused"] = {
            "runs": reused, **{k: (earlier or {}).get("provenance", {}).get(k)
                               for k in ("git_commit", "date")}}
    return output


def _earlier_results(earlier: dict[str, Any] | None, workload: str, seed: int,
                     settings: tuple[Setting, ...]) -> list[dict[str, Any]] | None:
    """The earlier run's results of every setting of (workload, seed), or None unless it
    holds all of them with the same parameters. A parameter added to ``Setting`` since the
    earlier run (``buckets_per_octave``, ``weights``) reads as its value before it existed
    (``LEGACY``): that run used it."""
    if earlier is None:
        return None
    found = {r["setting"]["name"]: r for r in earlier["results"]
             if (r["workload"], r["seed"]) == (workload, seed)}
    kept = [found.get(s.name) for s in settings]
    # A knob the earlier run's Setting lacked ran at its value before the knob existed.
    defaults = {**{f.name: f.default for f in fields(Setting) if f.default is not MISSING},
                **LEGACY}
    if any(r is None or {**defaults, **r["setting"]} != json.loads(json.dumps(asdict(s)))
           for r, s in zip(kept, settings, strict=True)):
        return None
    return [r for r in kept if r is not None]


def _save_partial(plan: Plan, references: list[tuple[Workload, Reference]],
                  results: list[dict[str, Any]]) -> None:
    """What is measured so far, next to the result file: a sweep that dies late can still
    be reported on (``--report-only``) instead of being rerun."""
    partial = {"mode": plan.mode, "plan": _plan_summary(plan), "seconds": 0.0,
               "provenance": _provenance(),
               "references": [reference.summary() for _, reference in references],
               "results": results}
    plan.json_path.parent.mkdir(parents=True, exist_ok=True)
    plan.json_path.with_suffix(".partial.json").write_text(json.dumps(partial))


def _provenance() -> dict[str, Any]:
    """Which code was measured: the commit, the files changed on top of it (read-only git
    queries; empty where git is unavailable), the date and the machine's load."""
    def git(*args: str) -> str:
        try:
            done = subprocess.run(["git", *args], cwd=_BENCH.parent, capture_output=True,
                                  text=True, timeout=30, check=False)
        except OSError:
            return ""
        return done.stdout.rstrip("\n") if done.returncode == 0 else ""
    changed = [line[3:] for line in git("status", "--porcelain").splitlines() if line]
    return {"git_commit": git("rev-parse", "HEAD"), "changed_files": changed,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "cpu_count": os.cpu_count(), "loadavg_1m_at_start": os.getloadavg()[0]}


def _run_one(plan: Plan, workload: Workload, reference: Reference, setting: Setting, *,
             scratch: Path, log: Callable[[str], None]) -> dict[str, Any]:
    before = time.perf_counter()
    result = run_setting(workload, reference, setting,
                         failures_per_seed=plan.failures_per_seed[workload.name],
                         workdir=scratch, force_lossy=workload.name in _FORCE_LOSSY)
    result["seconds"] = time.perf_counter() - before
    reworks = [r["rework"] for r in result["resumes"]]
    log(f"  {reference.workload} seed {reference.seed} {setting.name:24s} "
        f"{result['seconds']:5.1f} s  rework {reworks}")
    return result


def _confirmation_settings(
    plan: Plan, output: dict[str, Any], chosen: dict[str, Any]
) -> list[tuple[Setting, set[str]]]:
    """The chosen defaults at every K of the plan, on the workloads where the sweep did not
    already measure them."""
    measured = {(row["workload"], row["interval"]) for row in
                matching_rows(summarize(output), chosen)}
    extra = []
    for k in sorted({s.interval for s in plan.settings}):
        # The decoders run their own few settings only (they check the choice, at the
        # adaptive default; RESULTS.md says where that differs from the chosen).
        missing = {name for name in plan.workloads if (name, k) not in measured
                   and name not in DECODERS}
        if not missing:
            continue
        extra.append((Setting(
            f"chosen-K{k}", "chosen", k, chosen["bits"], representative=chosen["representative"],
            coder=chosen["coder"], base_interval=chosen["base_interval"],
            max_delta_fraction=chosen["max_delta_fraction"],
            min_lossy_elements=chosen["min_lossy_elements"], optim=chosen["optim"],
            weights=chosen["weights"], buckets_per_octave=chosen["buckets_per_octave"]),
            missing))
    return extra


def _snapshot_every(plan: Plan) -> int:
    """Keep the states every setting needs: every K of every setting divides this step."""
    intervals = {s.interval for s in plan.settings}
    step = min(intervals)
    if any(k % step for k in intervals):
        raise ValueError(f"intervals {sorted(intervals)} must all be multiples of {step}")
    return step


def _plan_summary(plan: Plan) -> dict[str, Any]:
    return {"workloads": plan.workloads, "seeds": plan.seeds, "steps": plan.steps,
            "only": plan.only, "seed_count": plan.seed_count,
            "failures_per_seed": plan.failures_per_seed,
            "force_lossy": sorted(_FORCE_LOSSY & set(plan.workloads)),
            "torch_threads": torch.get_num_threads()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--full", action="store_true",
                      help="the whole sweep (~40 min, 2 shared cores)")
    mode.add_argument("--quick", action="store_true", help="a smoke-sized sweep (< 1 min)")
    mode.add_argument("--report-only", type=Path, metavar="JSON",
                      help="rewrite RESULTS.md and plots from a saved result file")
    mode.add_argument("--centre", nargs="+", metavar="WORKLOAD",
                      help="the shipped defaults alone on these workloads (-> bench/out/centre/)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1],
                        help="--centre: the seeds")
    parser.add_argument("--intervals", type=int, nargs="+", default=[10, 50],
                        help="--centre: the checkpoint intervals K")
    parser.add_argument("--failures", type=int,
                        help="--centre: failures per seed (none: sizes only)")
    parser.add_argument("--out", type=Path, help="where RESULTS.md and plots/ go")
    parser.add_argument("--resume", type=Path, metavar="PARTIAL_JSON",
                        help="take the (workload, seed)s an interrupted run finished from its "
                             "partial result file (bench/out/recovery-full.partial.json)")
    args = parser.parse_args(argv)
    # One intra-op thread: bit-identical replays, and fair timings on a shared machine.
    torch.set_num_threads(1)
    if args.report_only:
        output = json.loads(args.report_only.read_text())
        write_report(output, args.out or (_BENCH if output["mode"] == "full" else
                                          args.report_only.parent))
        return 0
    if args.centre:
        plan = centre_plan(tuple(args.centre), tuple(args.seeds), tuple(args.intervals),
                           args.failures, args.out or _BENCH / "out" / "centre")
    else:
        plan = full_plan() if args.full else quick_plan(args.out or _BENCH / "out" / "quick")
    if args.out:
        plan = replace(plan, out_dir=args.out, json_path=args.out / plan.json_path.name)
    earlier = json.loads(args.resume.read_text()) if args.resume else None
    output = run_plan(plan, log=lambda line: print(line, flush=True), earlier=earlier)
    plan.json_path.parent.mkdir(parents=True, exist_ok=True)
    plan.json_path.write_text(json.dumps(output))
    plan.json_path.with_suffix(".partial.json").unlink(missing_ok=True)
    write_report(output, plan.out_dir)
    print(f"wrote {plan.out_dir / 'RESULTS.md'} and {plan.json_path} "
          f"({output['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
