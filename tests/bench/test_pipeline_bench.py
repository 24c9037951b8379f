"""Smoke test of the pipeline benchmark: ``python -m bench.pipeline`` runs end to end on a
small state and writes the ratios, the daemon's stage timings and the summary it prints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from bench_support import this_code_as_before

pytestmark = pytest.mark.bench
ROOT = Path(__file__).resolve().parents[2]


def test_pipeline_bench_reports_stages_ratios_and_targets(tmp_path: Path) -> None:
    out = tmp_path / "pipeline.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.pipeline", "--sizes", "16MiB", "--kinds", "adam",
         "--reps", "1", "--depth", "2", "--burst", "1", "--worker-counts", "1",
         "--before", str(this_code_as_before(tmp_path)),  # the deep chain restored by it too
         "--out", str(out)],  # its own short temporary directory: unix socket paths are short
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    [case] = report["cases"]
    assert (case["size"], case["kind"]) == ("16MiB", "adam")
    for name, seconds in case["seconds"].items():
        assert len(seconds) >= 1 and all(s > 0 for s in seconds), name
    # Every save of the run (3 reps' worth of runs, the deep chain, the burst) logged its
    # stages; the shared-memory base and delta are in the summary.
    base = case["stages"]["adam-shm-0/1"]
    assert base["kind"] == "base" and base["encode_exact_s"] > 0 and "sync_s" in base
    assert case["stages"]["adam-shm-0/2"]["encode_delta_s"] > 0
    assert case["stages"]["adam-shm-0/3"]["kind"] == "delta"  # the next delta
    assert case["stages"]["adam-deep/3"]["kind"] == "delta"
    served = case["restores"]["adam-shm-0/3"]  # the daemon timed the head's restore
    # A head is served as views (prepare: the budget only, which may round to 0).
    assert "prepare_s" in served[0] and served[0]["stream_s"] > 0
    assert served[0]["transport"] == "shm"  # same host: through the client's segment
    assert case["restores"]["adam-grpc-0/2"][0]["transport"] == "stream"
    assert "| 16MiB | adam | latest over gRPC |" in done.stdout
    assert "| 16MiB | adam | deep, from storage |" in done.stdout
    assert "| 16MiB | adam | (before) deep |" in done.stdout
    assert case["restores"]["before"]["adam-deep/3"][0]["stream_s"] > 0
    [ratios] = report["ratios"]
    assert ratios["restore_deep"] > 0 and ratios["sustained_over_torch_save"] > 0
    assert ratios["restore_deep_before"] > 0
    assert ratios["restore_latest_grpc"] > 0 and ratios["next_delta_save_shm"] > 0
    assert "| 16MiB | adam | next delta |" in done.stdout
    assert report["workers"][0]["MBps"]["1"] > 0
    assert "| 16MiB | adam |" in done.stdout and "Targets (ckptd over baseline" in done.stdout
    memory = case["daemon_memory"]  # the main daemon's resident bytes against its bound
    assert 0 < memory["idle_rss"] < memory["peak_rss"] <= memory["bound"]
    assert 0 < memory["peak_anon"] <= memory["peak_rss"]
    assert "| 16MiB | adam |" in done.stdout.split("The daemon's memory")[1]


def test_pipeline_bench_without_the_before_daemon(tmp_path: Path) -> None:
    """``--no-before`` (for 4GiB, where two daemons would not fit) runs one daemon: every
    before column is empty, every other one measured."""
    out = tmp_path / "pipeline.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.pipeline", "--sizes", "16MiB", "--kinds", "weights",
         "--reps", "1", "--depth", "2", "--burst", "1", "--worker-counts", "", "--no-before",
         "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    [case] = json.loads(out.read_text())["cases"]
    for name, seconds in case["seconds"].items():
        assert (seconds == []) == name.endswith("_before"), name
    assert case["stages_before"] == {} and "weights-shm-0/2" in case["stages"]
    assert case["daemon_memory"]["peak_rss"] > 0
