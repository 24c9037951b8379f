"""Smoke test of ``bench/codec_speed.py``: before/after side by side, end to end, tiny sizes.

The "before" side is this very code, laid out as the README's recipe lays out an older
checkout (a directory holding a ``ckptd`` package), so both sides must write the same
bytes; nothing here looks at timings.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from bench_support import REPO, this_code_as_before

pytestmark = pytest.mark.bench


def test_codec_speed_compares_two_sides_and_their_bytes(tmp_path: Path) -> None:
    before = this_code_as_before(tmp_path)
    out = tmp_path / "speed.json"
    proc = subprocess.run(
        [sys.executable, "bench/codec_speed.py", "--elements", "5000", "--reps", "1",
         "--before", str(before), "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert set(report["summary"]) == {"weights", "synthetic", "log", "bf16", "scaled",
                                         "first_sq"}
    for case, row in report["summary"].items():
        assert row["identical_bytes"], case
        assert row["before_blob_bytes"] == row["after_blob_bytes"] > 0
        assert row["after_chain_s"] > 0
    assert "| weights | before |" in proc.stdout and "same bytes" in proc.stdout


def test_stages_name_every_stage_of_each_case() -> None:
    proc = subprocess.run(
        [sys.executable, "bench/codec_speed.py", "--stages", "--cases", "scaled,bf16",
         "--elements", "300000", "--reps", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1]
            for line in proc.stdout.splitlines() if line.startswith("| ")}
    assert list(rows["stage (ns/element, thread CPU)"]) == [" scaled ", " bf16 "]
    fit = [float(cell) for cell in rows["scaled: fit alpha"]]
    assert fit[0] > 0 and fit[1] == 0  # only the scaled case fits a factor
    split = [float(cell) for cell in rows["entropy: split body (bitmap, non-zeros)"]]
    assert split[1] > 0  # bf16's chunks take the split layout (as at 16 Mi elements)
    totals = [float(cell) for cell in rows["total"]]
    parts = [sum(float(rows[name][i]) for name in rows
                 if name not in {"stage (ns/element, thread CPU)", "total"}
                 and not name.startswith(("total into", "of which")))
             for i in range(2)]
    for part, total in zip(parts, totals, strict=True):  # the stages add up to the whole
        assert abs(part - total) < 1e-6 + 0.02 * total
