"""Deleting is a way out of a full disk (issue 19): a real ENOSPC on a real file system.

The scenario (``full_disk_scenario.py``) runs in a child process inside a private mount
namespace (``unshare -m``) over a fresh 4 MiB tmpfs mounted under ``tmp_path``, so that the
mount is invisible to every other process and vanishes with the child. It needs root (or
CAP_SYS_ADMIN) and util-linux ``unshare``; elsewhere the test is skipped, saying which.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
SIZE = "4m"


def _namespace_problem() -> str:
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return "util-linux unshare and mount are not installed"
    if os.geteuid() != 0:
        return "mounting a tmpfs in a private mount namespace needs root"
    return ""


@pytest.mark.slow  # ~1.4-1.8 s: the fast tier stays under 90 s
def test_deleting_frees_a_full_disk_and_saving_works_again(tmp_path: Path) -> None:
    problem = _namespace_problem()
    if problem:
        pytest.skip(problem)
    mountpoint = tmp_path / "small"
    mountpoint.mkdir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(HERE), str(HERE.parent), os.environ.get("PYTHONPATH", "")]))
    script = ('mount -t tmpfs -o size="$2" ckptd-test "$1" && '
              'exec "$3" "$4" "$1"')
    result = subprocess.run(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh",
         str(mountpoint), SIZE, sys.executable, str(HERE / "full_disk_scenario.py")],
        capture_output=True, text=True, timeout=300, env=env, check=False,
    )
    denied = "permission denied" in result.stderr.lower()
    if result.returncode != 0 and "mount" in result.stderr and denied:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "full disk scenario passed" in result.stdout
    assert not any(mountpoint.iterdir())  # the tmpfs was private to the child
