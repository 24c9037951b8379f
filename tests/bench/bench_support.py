"""Helpers of the benchmark smoke tests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def this_code_as_before(tmp_path: Path) -> Path:
    """A directory holding this very code as a ``ckptd`` package, laid out as
    bench/README.md's recipe lays out an older checkout for ``--before``."""
    package = tmp_path / "before" / "ckptd"
    package.mkdir(parents=True)
    for part in ("daemon", "client", "protos"):
        (package / part).symlink_to(REPO / part)
    return package.parent


def run_bench(module: str, out: Path, *args: str) -> tuple[str, dict[str, Any]]:
    """Runs ``python -m bench.<module> ARGS --out OUT`` from the repository root and checks
    that it succeeded; returns what it printed and the JSON report it wrote."""
    done = subprocess.run(
        [sys.executable, "-m", f"bench.{module}", *args, "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout, json.loads(out.read_text())
