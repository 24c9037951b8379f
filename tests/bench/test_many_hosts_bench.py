"""Smoke test of the many-hosts benchmark: ``bench/many_hosts.py`` runs end to end on tiny
sizes (moto S3 on loopback, real daemon subprocesses) and reports both layouts and their
ratios. Nothing here looks at timings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.bench
REPO = Path(__file__).resolve().parents[2]


def test_many_hosts_bench_reports_both_layouts(tmp_path: Path) -> None:
    out = tmp_path / "many_hosts.json"
    proc = subprocess.run(
        [sys.executable, "bench/many_hosts.py", "--mb", "1", "--steps", "2", "--reps", "1",
         "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    keys = {"base_step_s", "delta_step_s", "restore_own_s", "restore_other_s"}
    for layout in ("one_daemon", "two_daemons", "ratio_two_over_one"):
        assert set(report[layout]) == keys, layout
        assert all(value > 0 for value in report[layout].values()), layout
    assert len(report["raw"]["two_daemons"][0]["delta_steps_s"]) == 1
    assert "ratio" in proc.stdout
