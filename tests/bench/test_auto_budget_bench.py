"""``bench/auto_budget.py``: the recovery harness run with a state-relative bits="auto".

One command as a user runs it (logreg, one seed, one setting, sizes only): the daemon it
starts takes the setting's ``auto_bits_relative_to``, the weights get the adaptive width
and the optimizer state the fixed one its policy names, and the summary reports both.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import pytest
from ckptd.daemon.config import EngineConfig

from bench.auto_budget import (
    clustered_2se,
    fine_settings,
    loosened,
    main,
    make_plan,
    per_failure,
    pooled,
    state_settings,
)
from bench.recovery import _earlier_results
from bench.recovery_ckptd import Setting, client_policies, daemon_config
from bench.recovery_protocol import ema, first_reached

ROOT = Path(__file__).resolve().parents[2]


def test_settings_reach_the_daemon_and_the_client(tmp_path: Path) -> None:
    settings = state_settings([0.01], [10, 50], [1024, 1], ["sq-log", "fixed:3"], True)
    assert len({s.name for s in settings}) == 8
    setting = next(s for s in settings if s.name == "state0.01-K50-minlossy1-optim-fixed3")
    engine = daemon_config(setting, tmp_path).engine
    assert (engine.auto_bits_relative_to, engine.auto_bits_max_error,
            engine.min_lossy_elements) == ("state", 0.01, 1)
    assert ("optim/state/*/exp_avg_sq", "lossy-log:3") in client_policies(setting, False)


def test_second_moment_takes_its_own_width() -> None:
    [setting] = state_settings([0.03], [50], [1], ["fixed:2-sq3"], False)
    assert setting.name == "state0.03-K50-minlossy1-optim-fixed2-sq3"
    assert re.fullmatch(r"[A-Za-z0-9._-]+", setting.name)  # it becomes the daemon's run name
    rules = client_policies(setting, False)
    assert rules[:4] == [("optim/state/*/step", "exact"),
                         ("optim/state/*/exp_avg_sq", "lossy-log:3"),
                         ("optim/state/*/exp_avg", "lossy-scaled:2"),
                         ("optim/state/*", "lossy:2")]


def test_failures_and_fixed_rows_reach_the_plan(tmp_path: Path) -> None:
    args = argparse.Namespace(
        workloads=["lm"], seeds=[0, 1], intervals=[50], budgets=[0.01], min_lossy=[1],
        optim=["fixed:3"], bits=["4", "exact"], bits_optim="sq-log", bits_min_lossy=1024,
        failures=18, steps=2000, sizes_only=False, fine=["4:2"],
        out=tmp_path / "a.json")
    plan = make_plan(args)
    assert plan.failures_per_seed["lm"] == 18
    assert plan.failures_per_seed["lenet"] == 16  # the sweep's, for workloads not chosen
    assert (plan.steps["lm"], plan.steps["lenet"]) == (2000, 400)
    names = {s.name: s for s in plan.settings}
    assert set(names) == {"exact-K50", "b4-K50", "state0.01-K50-minlossy1-optim-fixed3",
                          "fine2-b4-K50-minlossy1-optim-fixed3"}
    assert all(s.measure_rework for s in plan.settings)
    assert names["fine2-b4-K50-minlossy1-optim-fixed3"].buckets_per_octave == 2
    assert (names["b4-K50"].bits, names["b4-K50"].optim) == (4, "sq-log")
    assert names["exact-K50"].bits is None


def test_fixed_rows_take_an_optimizer_policy(tmp_path: Path) -> None:
    args = argparse.Namespace(
        workloads=["gpt"], seeds=[0], intervals=[50], budgets=[], min_lossy=[1024],
        optim=["sq-log"], bits=["3", "exact"], bits_optim="fixed:2-sq3", bits_min_lossy=1024,
        failures=None, steps=None, sizes_only=True, fine=[], out=tmp_path / "a.json")
    names = {s.name: s for s in make_plan(args).settings}
    assert set(names) == {"exact-K50", "b3-K50-optim-fixed2-sq3"}
    rules = client_policies(names["b3-K50-optim-fixed2-sq3"], False)
    assert ("optim/state/*/exp_avg_sq", "lossy-log:3") in rules
    assert ("optim/state/*/exp_avg", "lossy-scaled:2") in rules
    assert names["exact-K50"].optim == "builtin"  # the sweep's centre: the shipped rules
    assert names["b3-K50-optim-fixed2-sq3"].min_lossy_elements == 1024


def test_fixed_rows_take_small_tensors_lossy(tmp_path: Path) -> None:
    # The per-optimizer rule for AdamW (issue 16): weights b3, exp_avg b2, exp_avg_sq b3,
    # small tensors lossy; the exact baseline keeps its own (sweep) setting.
    args = argparse.Namespace(
        workloads=["gpt"], seeds=[0, 1], intervals=[50, 10], budgets=[], min_lossy=[1024],
        optim=["sq-log"], bits=["3", "exact"], bits_optim="fixed:2-sq3", bits_min_lossy=1,
        failures=6, steps=None, sizes_only=False, fine=[], out=tmp_path / "a.json")
    names = {s.name: s for s in make_plan(args).settings}
    assert set(names) == {"exact-K50", "exact-K10", "b3-K50-optim-fixed2-sq3-minlossy1",
                          "b3-K10-optim-fixed2-sq3-minlossy1"}
    setting = names["b3-K50-optim-fixed2-sq3-minlossy1"]
    assert re.fullmatch(r"[A-Za-z0-9._-]+", setting.name)  # it becomes the daemon's run name
    engine = daemon_config(setting, tmp_path).engine
    assert (engine.default_bits, engine.min_lossy_elements) == (3, 1)
    assert client_policies(setting, False)[0] == ("optim/state/*/step", "exact")
    assert names["exact-K50"].min_lossy_elements == EngineConfig().min_lossy_elements


def _run(seed: int, minutes: float, load_end: float) -> dict:
    result = {"workload": "gpt", "seed": seed, "setting": {"name": "b3-K50"}}
    return {"mode": "auto-budget", "seconds": 60 * minutes,
            "provenance": {"date": f"seed {seed}", "loadavg_1m_at_end": load_end},
            "references": [{"workload": "gpt", "seed": seed}], "results": [result]}


def test_runs_of_one_seed_each_are_reported_as_one() -> None:
    both = pooled([_run(0, 10, 3.0), _run(1, 20, 5.0)])
    assert [r["seed"] for r in both["results"]] == [0, 1]
    assert [r["seed"] for r in both["references"]] == [0, 1]
    assert both["seconds"] == 1800
    assert both["provenance"] == {"date": "seed 0", "loadavg_1m_at_end": 5.0}
    with pytest.raises(SystemExit, match="the same workload, seed and setting"):
        pooled([_run(0, 10, 3.0), _run(0, 10, 3.0)])


def _resume(restore_step: int, rework: int, exact: int) -> dict[str, int]:
    return {"restore_step": restore_step, "rework": rework, "exact_rework": exact}


def test_clustered_2se_groups_failures_by_their_checkpoint() -> None:
    # Two checkpoints, each restored twice with the same excess: as wide as the two
    # checkpoints alone, where the plain 2se counts four independent failures.
    two = [{"seed": 0, "resumes": [_resume(100, 12, 10), _resume(200, 10, 10)]}]
    four = [{"seed": 0, "resumes": [_resume(100, 12, 10), _resume(100, 13, 11),
                                   _resume(200, 10, 10), _resume(200, 11, 11)]}]
    assert clustered_2se(two) == pytest.approx(clustered_2se(four) * 10.5 / 10)
    assert clustered_2se(two) == pytest.approx(2 * 1.0 / 10)  # d = 2, 0: se 1
    assert clustered_2se([{"seed": 0, "resumes": [_resume(100, 12, 10)]}]) is None


@pytest.mark.bench
def test_failures_and_steps_set_per_run_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "fixed.json"
    assert main(["--workloads", "logreg", "--seeds", "0", "--intervals", "10", "--budgets",
                 "--bits", "3", "--failures", "2", "--steps", "200", "--out", str(out)]) == 0
    output = json.loads(out.read_text())
    assert output["references"][0]["steps"] == 200
    result = output["results"][0]
    assert result["setting"]["name"] == "b3-K10"
    assert len(result["resumes"]) == 2
    assert len(result["steps"]) == 20  # a checkpoint every 10 of the 200 steps
    row = next(line for line in out.with_suffix(".md").read_text().splitlines()
               if "`b3-K10` |" in line)
    assert re.search(r"\| \d/\d of 2 \|", row)
    # 20 checkpoints, fewer than the history line's 40: the count is shown; then the
    # restored weights' / optimizer state's error.
    assert re.search(r"x \(20\) \|", row)
    assert re.search(r"\| \d\.\d{3} / \d\.\d{2}(; [^|]+)? \|$", row)


@pytest.mark.bench
def test_one_setting_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "auto.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.auto_budget", "--workloads", "logreg", "--seeds", "0",
         "--budgets", "0.03", "--intervals", "10", "--min-lossy", "1", "--optim", "fixed:3",
         "--sizes-only", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(out.read_text())["results"][0]
    assert result["setting"]["auto_relative_to"] == "state"
    assert result["delta_breakdown"]["momentum_buffer_bits3_elements"] > 0
    row = next(line for line in out.with_suffix(".md").read_text().splitlines()
               if "`state0.03-K10-minlossy1-optim-fixed3`" in line)
    assert re.search(r"momentum_buffer 3\.0", row) and re.search(r"model \d\.\d", row)


def test_results_before_finer_buckets_still_resume() -> None:
    """An interrupted run from before ``Setting.buckets_per_octave`` existed is reused for
    a setting at the value it ran (1, octaves), not for one with finer buckets (the
    shipped 2)."""
    setting = Setting("b3-K10", "grid", 10, 3, buckets_per_octave=1)
    old = {k: v for k, v in asdict(setting).items() if k != "buckets_per_octave"}
    earlier = {"results": [{"workload": "lm", "seed": 0, "setting": old}]}
    assert _earlier_results(earlier, "lm", 0, (setting,)) == earlier["results"]
    finer = replace(setting, buckets_per_octave=2)
    assert _earlier_results(earlier, "lm", 0, (finer,)) is None


def test_one_group_exact_and_the_model_exact() -> None:
    """The attribution forms (issue 16, i16a): either moment exact, or the model exact with
    the optimizer state lossy; the step counters stay exact first, and the name stays a
    valid run name."""
    [sq_exact, m_exact, model_exact] = fine_settings(
        ["4:2"], [50], [1], ["fixed:2-sqexact", "fixed:exact-sq3", "exactmodel-fixed:2-sq3"],
        True)
    assert model_exact.name == "fine2-b4-K50-minlossy1-optim-exactmodel-fixed2-sq3"
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", s.name)
               for s in (sq_exact, m_exact, model_exact))
    assert client_policies(sq_exact, False)[1:3] == [
        ("optim/state/*/exp_avg_sq", "exact"), ("optim/state/*/exp_avg", "lossy-scaled:2")]
    assert client_policies(m_exact, False)[1:] == [
        ("optim/state/*/exp_avg_sq", "lossy-log:3"), ("optim/state/*/exp_avg", "exact"),
        ("optim/state/*", "exact")]
    rules = client_policies(model_exact, False)
    assert rules[:3] == [("optim/state/*/step", "exact"), ("model/*", "exact"),
                         ("optim/state/*/exp_avg_sq", "lossy-log:3")]
    # Without the prefix the model's tensors are left to the daemon (the finer buckets).
    assert all(pattern != "model/*" for pattern, _ in client_policies(m_exact, True))
    # The prefix is the command line's spelling of Setting.weights="exact".
    spelled = replace(model_exact, optim="fixed:2-sq3", weights="exact")
    assert client_policies(spelled, False) == rules


def _failure(restore_step: int, failed_at: int, rework: int, exact: int,
             eval_loss: list[float]) -> dict[str, Any]:
    return {"restore_step": restore_step, "failed_at": failed_at, "rework": rework,
            "exact_rework": exact, "censored": False, "diverged": False,
            "target": 1.0, "eval_loss": eval_loss}


def test_per_failure_sets_settings_side_by_side() -> None:
    # A flat reference at loss 2 (its smoothed curve too); each failure's target is 1, so
    # the margin reads as the resumed run's smoothed loss when exact reached the target.
    reference = {"workload": "lm", "seed": 0, "eval_loss": [2.0] * 11}
    lossy = [_failure(2, 4, 6, 2, [9.0, 1.02, 1.01, 1.0, 1.0, 1.0, 1.0]),
             _failure(4, 6, 2, 2, [9.0, 1.0, 1.0])]
    other = [_failure(2, 4, 2, 2, [9.0, 1.0, 1.0]), _failure(4, 6, 5, 2, [9.0] * 6)]
    output = {"references": [reference], "results": [
        {"workload": "lm", "seed": 0, "setting": {"name": name, "interval": 2, "bits": 4},
         "resumes": resumes} for name, resumes in (("a", lossy), ("b", other))]}
    text = per_failure(output, top=1)
    assert "(1) `a`; (2) `b`" in text
    rows = [line for line in text.splitlines() if line.startswith("| 0 |")]
    # The resumed run's EMA (from the reference's at step 2, i.e. 2.0) after 2 steps:
    # 0.3 * 1.01 + 0.7 * (0.3 * 1.02 + 0.7 * 2.0) = 1.4972 against a target of 1.0.
    assert rows[0] == "| 0 | 2 | 4 | 2 | 6 (+49.72%) | 2 |"
    assert rows[1].startswith("| 0 | 4 | 6 | 2 | 2 | 5 (+")
    assert text.splitlines()[-1] == "| excess: top 1 / all of exact's | | | | 4/4 of 4 | 3/3 of 4 |"


def test_a_loosened_target_reads_the_stored_curves() -> None:
    # A reference falling 0.1 a step; the lossy run restored at 2 trails it by 0.02 and so
    # reaches the reference's smoothed loss at 4 only a few steps late.
    losses = [3.0 - 0.1 * t for t in range(12)]
    curve = ema(losses, losses[0])
    resumed = [losses[0]] + [x + 0.02 for x in losses[3:12]]
    reached = first_reached(ema(resumed[1:], curve[2]), curve[4], start=0)
    assert reached is not None and reached + 1 > 2  # later than exact's 2 steps
    resume = {**_failure(2, 4, reached + 1, 2, resumed), "target": curve[4]}
    output = {"references": [{"workload": "lm", "seed": 0, "eval_loss": losses}],
              "results": [{"workload": "lm", "seed": 0, "resumes": [resume],
                           "setting": {"name": "a", "interval": 2, "bits": 4}}]}
    row = loosened(output, [0.0, 0.05]).splitlines()[-1]
    # At 0 the protocol's own ratio; 5 % looser, both reach it at the same step.
    assert row == f"| lm | 2 | `a` | {(reached + 1) / 2:.2f} +/- 0.00 | 1.00 +/- 0.00 |"


def test_one_parameter_groups_first_moment_takes_its_own_width() -> None:
    # lm's optimizer-state indices by parameter group, as the harness derives them.
    groups = {0: "embedding", 1: "embedding", 2: "norm/bias", 3: "attention", 4: "head"}
    [setting] = fine_settings(["4:2"], [50], [1], ["fixed:2-head3-embeddingexact"], True)
    assert setting.name == "fine2-b4-K50-minlossy1-optim-fixed2-head3-embeddingexact"
    assert client_policies(setting, False, groups)[1:] == [
        ("optim/state/*/exp_avg_sq", "lossy-log:2"),
        ("optim/state/0/exp_avg", "exact"), ("optim/state/1/exp_avg", "exact"),
        ("optim/state/4/exp_avg", "lossy-scaled:3"),
        ("optim/state/*/exp_avg", "lossy-scaled:2"), ("optim/state/*", "lossy:2")]
    with pytest.raises(ValueError, match="no parameter groups"):
        client_policies(setting, False)
    [malformed] = fine_settings(["4:2"], [50], [1], ["fixed:2-head"], True)
    with pytest.raises(ValueError, match="'head' is not <group><bits>"):
        client_policies(malformed, False, groups)


def test_sq_log_and_auto_leave_the_weights_to_the_daemon() -> None:
    """The Adam set ends in a ``*`` rule at b3, which would pin the weights whatever the
    daemon's width: ``sq-log`` and ``auto`` (the forms that predate it) name the daemon."""
    from ckptd.client.policies import ADAM_RULES, parse_rules, resolve
    from ckptd.protos.v1 import pb

    for optim in ("sq-log", "auto"):
        [setting] = state_settings([0.05], [50], [1], [optim], False)
        rules = parse_rules(client_policies(setting, False))
        assert resolve(rules, "model/fc.weight", 0, ADAM_RULES)[0] == pb.POLICY_UNSPECIFIED
    [setting] = state_settings([0.05], [50], [1], ["sq-log"], False)
    rules = parse_rules(client_policies(setting, False))
    assert resolve(rules, "optim/state/0/exp_avg_sq", 0, ADAM_RULES)[0] == pb.POLICY_LOSSY_LOG
    assert resolve(rules, "optim/state/0/exp_avg", 0, ADAM_RULES)[0] == pb.POLICY_LOSSY_SCALED
