"""A checkpointer across ``fork()``: the child cannot use it, and cannot harm the parent's.

A forked child inherits the checkpointer object but neither its sender threads nor a usable
gRPC channel: a save there used to return a handle that never resolved (a save silently
lost), and the child's normal exit ran the inherited finalizer, which unlinked the parent's
shared-memory staging segment, so the parent's next save failed (``transport="shm"``) or
fell back to streaming for good (``"auto"``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from daemon_harness import InProcessDaemon

JOB = Path(__file__).with_name("fork_job.py")


def test_a_forked_child_cannot_save_and_leaves_the_parents_shared_memory(
    daemon: InProcessDaemon, tmp_path: Path
) -> None:
    done = subprocess.run([sys.executable, str(JOB), daemon.address], capture_output=True,
                          text=True, timeout=300, check=False, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])

    assert report["child"].startswith("RuntimeError: "), report
    assert "forked from it" in report["child"] and "create a new Checkpointer" in report["child"]
    assert report["child_exits"] == [0, 0]
    assert report["staged_segments"] >= 1 and report["segments_kept"], report
    assert report["parent_durable"] and report["parent_error"] is None, report
    assert report["transport"] == "shm" and report["restored_ok"], report
    assert report["steps"] == [1, 3]
