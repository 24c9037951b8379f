"""The README's first command, ``python examples/demo.py``, end to end.

It starts a real daemon, trains, is SIGKILLed, resumes and reports; the test runs it as a
user would (shorter) and checks the report names what happened, from measurements.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_crashes_resumes_and_reports(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "examples/demo.py", "--workdir", str(tmp_path),
         "--steps", "40", "--every", "5", "--kill-at", "22"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert "killing this process at step 22" in out
    resumed = re.search(r"resumed from step (\d+)", out)
    assert resumed is not None and int(resumed.group(1)) in (15, 20), out
    assert "first trainer  : SIGKILLed (exit -9); resumed trainer: exit 0" in out
    kept = re.search(r"steps kept     : (\d+) \(5\.\.40\), (\d+) base \+ (\d+) delta", out)
    assert kept is not None, out
    assert int(kept.group(2)) >= 1 and int(kept.group(3)) >= 1
    ratio = re.search(r"as torch\.save files = ([\d.]+)x smaller", out)
    assert ratio is not None and float(ratio.group(1)) > 1.0, out
    assert "daemon stopped (exit 0)" in out
    assert (tmp_path / "store").is_dir() and (tmp_path / "stats.jsonl").is_file()
