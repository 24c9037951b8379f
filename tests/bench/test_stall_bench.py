"""Smoke test of the stall benchmark: ``bench/stall.py`` runs end to end on a small state,
with both snapshot modes in the training loop, and writes what its summary reads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.bench
ROOT = Path(__file__).resolve().parents[2]


def test_stall_bench_runs_and_reports_both_snapshot_modes(tmp_path: Path) -> None:
    out = tmp_path / "stall.json"
    done = subprocess.run(
        [sys.executable, "bench/stall.py", "--sizes", "10MB", "--reps", "2",
         "--transports", "shm", "--loop-kinds", "idle", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    [result] = report["results"]
    assert result["label"] == "10MB" and set(result["ckptd"]) == {"shm"}
    loops = {(loop["kind"], loop["mode"]): loop for loop in result["loop"]}
    assert set(loops) == {("idle", "copy"), ("idle", "overlap")}
    for loop in loops.values():
        assert len(loop["save_s"]) == len(loop["wait_s"]) == 2
        assert all(s > 0 for s in loop["save_s"] + loop["plain_iteration_s"])
    assert "| 10MB | shm | idle | overlap |" in done.stdout
