"""``bench/auto_budget.py``: the recovery harness run with a state-relative bits="auto".

One command as a user runs it (logreg, one seed, one setting, sizes only): the daemon it
starts takes the setting's ``auto_bits_relative_to``, the weights get the adaptive width
and the optimizer state the fixed one its policy names, and the summary reports both.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench.auto_budget import state_settings
from bench.recovery_ckptd import client_policies, daemon_config

ROOT = Path(__file__).resolve().parents[2]


def test_settings_reach_the_daemon_and_the_client(tmp_path: Path) -> None:
    settings = state_settings([0.01], [10, 50], [1024, 1], ["sq-log", "fixed:3"], True)
    assert len({s.name for s in settings}) == 8
    setting = next(s for s in settings if s.name == "state0.01-K50-minlossy1-optim-fixed3")
    engine = daemon_config(setting, tmp_path).engine
    assert (engine.auto_bits_relative_to, engine.auto_bits_max_error,
            engine.min_lossy_elements) == ("state", 0.01, 1)
    assert ("optim/state/*/exp_avg_sq", "lossy-log:3") in client_policies(setting, False)


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
