"""``bench/quantizers.py``: the weights' quantizers compared on real lm deltas (quick mode).

Its two claims a reader takes from the summary must hold on the data it measures: the
uniform quantizer with exceptions keeps the restored error within its budget (every element
within q/2 of its level, the mean no further in L2), and half-octave buckets restore the
same delta with less error than octaves at one width.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.auto_budget import fine_settings
from bench.quantizers import main
from bench.recovery_ckptd import daemon_config


@pytest.mark.slow  # ~4 s: 50 lm training steps and 17 encodes of its weights
def test_quick_run_reports_every_quantizer(tmp_path: Path) -> None:
    out = tmp_path / "q.json"
    assert main(["--quick", "--out", str(out)]) == 0
    [case] = json.loads(out.read_text())["cases"]
    rows = case["rows"]
    assert {r["kind"] for r in rows} == {"lc", "uniform"}
    for row in rows:
        if row["kind"] == "uniform" and row["outliers"] == "exc":
            assert row["relative_l2"] <= row["eps"]
    lc = {(r["bits"], r["per_octave"]): r for r in rows if r["kind"] == "lc"}
    assert lc[4, 2]["relative_l2"] < lc[4, 1]["relative_l2"]
    assert "2/octave b4" in out.with_suffix(".md").read_text()


def test_fine_settings_reach_the_daemon(tmp_path: Path) -> None:
    settings = fine_settings(["4:2", "auto0.005:4"], [10, 50], [1], ["fixed:2"], True)
    names = [s.name for s in settings]
    assert names[0] == "fine2-b4-K10-minlossy1-optim-fixed2" and len(set(names)) == 4
    engine = daemon_config(settings[0], tmp_path).engine
    assert (engine.default_bits, engine.buckets_per_octave) == (4, 2)
    engine = daemon_config(settings[-1], tmp_path).engine
    assert (engine.auto_bits_max_error, engine.buckets_per_octave) == (0.005, 4)
