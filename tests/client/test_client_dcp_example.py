"""``examples/dcp_example.py`` runs as the README shows: two ranks save three steps with
DCP through a real daemon, then one rank resumes from the latest complete step (DCP
reshards 2 -> 1) and saves two more."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from client_support import CheckpointerFactory
from daemon_harness import InProcessDaemon

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "dcp_example.py"
RUN = "dcp-example"


def _example(target: str, *args: str) -> str:
    command = [sys.executable, str(EXAMPLE), "--target", target, "--run", RUN, *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


@pytest.mark.slow
def test_dcp_example_saves_and_resumes_on_fewer_ranks(
    daemon: InProcessDaemon, make_checkpointer: CheckpointerFactory
) -> None:
    first = _example(daemon.address, "--world", "2", "--steps", "3")
    assert [line.split()[2] for line in first.splitlines()] == ["1", "2", "3"]
    second = _example(daemon.address, "--world", "1", "--steps", "2", "--resume")
    assert second.splitlines()[0] == "resumed from step 3 on 1 ranks"
    rank0 = make_checkpointer(daemon.address, RUN, rank=0)
    assert rank0.steps() == [1, 2, 3, 4, 5]
    assert rank0.latest_step() == 5
    assert [info.world_size for info in rank0.step_infos()] == [2, 2, 2, 1, 1]
    assert [info.kind for info in rank0.step_infos()][:3] == ["base", "delta", "delta"]
