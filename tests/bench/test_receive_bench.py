"""Smoke test of the receive benchmark: ``python -m bench.receive`` times the daemon's
shared-memory receive into fresh and reused buffers and leaves no segment behind."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.bench
ROOT = Path(__file__).resolve().parents[2]


def test_receive_bench_times_fresh_and_reused_buffers(tmp_path: Path) -> None:
    out = tmp_path / "receive.json"
    before = {p.name for p in Path("/dev/shm").glob("ckptd-bench-receive-*")}
    done = subprocess.run(
        [sys.executable, "-m", "bench.receive", "--sizes", "16MiB", "--reps", "1",
         "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    [case] = json.loads(out.read_text())["cases"]
    assert case["size"] == "16MiB" and case["tensors"] > 1
    assert set(case["seconds"]) == {"fresh", "reused", "prepared", "prepare", "mapped_copy"}
    assert all(s > 0 for seconds in case["seconds"].values() for s in seconds)
    assert "| 16MiB | reused |" in done.stdout and "| 16MiB | prepared |" in done.stdout
    assert {p.name for p in Path("/dev/shm").glob("ckptd-bench-receive-*")} == before
