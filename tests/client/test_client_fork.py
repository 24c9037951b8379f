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

import pytest
from daemon_harness import InProcessDaemon

JOB = Path(__file__).with_name("fork_job.py")


@pytest.mark.slow  # a subprocess importing torch and forking twice: ~2-4 s
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


_GUARD_IN_CHILD = """
import os
from ckptd.client.overlap import SnapshotThread

copies = SnapshotThread(lambda job: None, lambda buffer: None)
copies._pending = 1  # as if a copy were running on the parent's thread at the fork
pid = os.fork()
if pid == 0:
    try:
        copies.wait(timeout_s=2.0)  # what a guarded optimizer's step calls
        os._exit(0)
    except Exception:
        os._exit(3)
_, status = os.waitpid(pid, 0)
print(os.waitstatus_to_exitcode(status))
"""


@pytest.mark.slow  # a subprocess importing torch: ~2-3 s
def test_a_guard_in_a_forked_child_does_not_wait_for_the_parents_copies() -> None:
    """The copy thread stays in the parent: a child stepping a guarded optimizer would wait
    for a pending count that never falls (it timed out, or with no timeout hung)."""
    done = subprocess.run([sys.executable, "-c", _GUARD_IN_CHILD], capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "0"
