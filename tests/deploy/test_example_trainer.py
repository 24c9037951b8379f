"""The deploy examples' workload (deploy/example_trainer.py) against a real daemon: it
trains, checkpoints, exits only when durable, and a restarted container resumes."""

from __future__ import annotations

import subprocess
import sys

import pytest
from daemon_harness import InProcessDaemon
from deploy_files import DEPLOY

EXAMPLE = DEPLOY / "example_trainer.py"


def train(daemon: InProcessDaemon, steps: int) -> str:
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), "--target", daemon.address, "--run", "example",
         "--steps", str(steps), "--every", "2"],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.mark.slow
def test_example_trainer_saves_then_resumes(daemon: InProcessDaemon) -> None:
    first = train(daemon, 4)
    assert "resumed" not in first
    assert "step 4 " in first
    assert "every checkpoint is durable" in first
    assert daemon.call(lambda engine: [s.step for s in engine.list_steps("example", 0)]) == [2, 4]

    second = train(daemon, 6)
    assert "resumed run 'example' rank 0 at step 4" in second
    assert daemon.call(lambda engine: [s.step for s in engine.list_steps("example", 0)]) == [
        2, 4, 6,
    ]
