"""Smoke test of the restore benchmark: ``python -m bench.restore`` runs end to end on a
small state, its before side's client runs in a process on the ``--before`` code (here a
package directory linking this code, built as bench/README.md's recipe builds ``main``),
and it writes every case's seconds and the summary it prints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from bench_support import REPO, run_bench, this_code_as_before

pytestmark = pytest.mark.bench


def test_restore_bench_times_every_case_on_both_sides(tmp_path: Path) -> None:
    before = this_code_as_before(tmp_path)
    out = tmp_path / "restore.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.restore", "--sizes", "16MiB", "--reps", "2",
         "--before", str(before), "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"before client: {before}/ckptd/client/__init__.py" in done.stdout
    [case] = json.loads(out.read_text())["cases"]
    assert set(case["seconds"]) == {"torch_load", "latest_shm", "latest_shm_before",
                                    "latest_shm_views", "latest_grpc", "latest_grpc_before",
                                    "base_shm", "base_shm_before"}
    for name, seconds in case["seconds"].items():
        assert len(seconds) == 2 and all(s > 0 for s in seconds), name
    served = case["restores"]["after"]["r/2"]  # the head: shm twice (copy, views), stream
    assert sorted(line["transport"] for line in served) == ["shm"] * 4 + ["stream"] * 2
    for name in ("latest_shm", "latest_shm_views", "latest_grpc", "base_shm"):
        assert f"| 16MiB | {name} |" in done.stdout
    for name, reps in case["cpu"].items():  # client and daemon CPU seconds per restore
        assert len(reps) == 2 and all(client > 0 and daemon >= 0 for client, daemon in reps), name
    assert set(case["cpu"]) == set(case["seconds"]) - {"torch_load"}


def test_restore_timeline_follows_each_restore_batch_by_batch(tmp_path: Path) -> None:
    printed, report = run_bench("restore_timeline", tmp_path / "timeline.json",
                                "--sizes", "16MiB", "--reps", "2")
    [case] = report["cases"]
    assert set(case["restores"]) == {"latest", "latest_huge", "latest_inline", "views", "base"}
    for name, reps in case["restores"].items():
        assert len(reps) == 2, name
        for rep in reps:
            assert 0 < rep["header_s"] <= rep["first_ready_s"] <= rep["last_ready_s"], name
            assert rep["last_ready_s"] < rep["total_s"] and rep["client_copy_s"] > 0, name
            assert rep["client_cpu_s"] > 0, name
        assert f"| 16MiB | {name} |" in printed


def test_restore_after_saves_times_hot_and_settled_restores_on_both_daemons(
    tmp_path: Path,
) -> None:
    before = this_code_as_before(tmp_path)
    printed, report = run_bench("restore_after_saves", tmp_path / "after_saves.json",
                                "--sizes", "16MiB", "--reps", "2", "--before", str(before))
    [case] = report["cases"]
    assert len(case["seconds"]["torch_load"]) == 2
    for side in ("after", "before"):
        reps = case["seconds"][side]
        assert len(reps) == 2, side
        for rep in reps:
            for when in ("hot", "settled"):
                assert rep[when]["wall_s"] > 0 and rep[when]["client_cpu_s"] > 0, (side, when)
                # In clock ticks (10 ms): a 16 MiB restore may cost the daemon less.
                assert rep[when]["daemon_cpu_s"] >= 0, (side, when)
                assert rep[when]["unwritten_mib_at_start"] >= 0, (side, when)
            assert rep["settled"]["settle_s"] >= 0
        for when in ("hot", "settled"):
            assert f"| 16MiB | {when} | {side} |" in printed


def test_restore_breakdown_times_each_stage_of_a_base_and_a_deep_restore(
    tmp_path: Path,
) -> None:
    printed, report = run_bench("restore_breakdown", tmp_path / "breakdown.json",
                                "--sizes", "16MiB", "--reps", "2", "--depth", "2")
    [case] = report["cases"]
    assert case["depth"] == 2 and len(case["reps"]["torch_load"]) == 2
    for name in ("base", "deep"):
        assert len(case["reps"][name]) == 2, name
        for rep in case["reps"][name]:
            # Every stage ran (the base's blobs are read; the deep one's deltas hashed).
            assert rep["wall_s"] > 0 and rep["cpu_s"] > 0, name
            assert rep["read"] > 0 and rep["apply"] > 0 and rep["write"] > 0, name
            assert rep["fold"] > 0, name
        assert f"| 16MiB | {name} |" in printed
    assert all(rep["blob_hash"] > 0 for rep in case["reps"]["deep"])
