"""Smoke test of the transport benchmark: ``python -m bench.transport`` runs end to end on a
small state against two daemons (the ``--before`` one a package directory linking this code,
built as bench/README.md's recipe builds ``main``) and writes every measurement of both
sides and the summary it prints."""

from __future__ import annotations

from pathlib import Path

import pytest
from bench_support import run_bench, this_code_as_before

pytestmark = pytest.mark.bench


def test_transport_bench_times_saves_and_restores_on_both_sides(tmp_path: Path) -> None:
    before = this_code_as_before(tmp_path)
    printed, report = run_bench("transport", tmp_path / "transport.json", "--sizes", "16MiB",
                                "--reps", "2", "--before", str(before),
                                "--daemon-flags", "--stream-saves never", "--parts")
    [case] = report["cases"]
    assert case["size"] == "16MiB" and case["bytes"] > 16 << 20
    assert len(case["seconds"]) == 12  # save/restore x wall/daemon/client x after/before
    for name, values in case["seconds"].items():
        assert len(values) == 2 and all(v >= 0 for v in values), name
        if name.startswith(("save_s_", "restore_s_")):
            assert all(v > 0 for v in values), name
    assert sorted(case["save_switches"]) == [
        "client_after", "client_before", "daemon_after", "daemon_before"]
    for name, counts in case["save_switches"].items():
        assert len(counts) == 2 and all(c > 0 for c in counts), name  # a save wakes threads
    for what in ("save", "restore"):
        for side in ("after", "before"):
            assert f"| 16MiB | {what} | {side} |" in printed
    assert len(report["parts"]) == 5 and all(s > 0 for s in report["parts"].values())
    assert "| daemon: hand parse (a view) |" in printed
