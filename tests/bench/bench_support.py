"""Helpers of the benchmark smoke tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def this_code_as_before(tmp_path: Path) -> Path:
    """A directory holding this very code as a ``ckptd`` package, laid out as
    bench/README.md's recipe lays out an older checkout for ``--before``."""
    package = tmp_path / "before" / "ckptd"
    package.mkdir(parents=True)
    for part in ("daemon", "client", "protos"):
        (package / part).symlink_to(REPO / part)
    return package.parent


def run_bench(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Runs ``python -m bench.{module} ARGS`` from the repository root (10 min at most)."""
    return subprocess.run([sys.executable, "-m", f"bench.{module}", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600, check=False)
