"""The house style's static checks, run by the suite so CI enforces them on every change.

ruff covers the whole repository (package, tests, benchmarks, examples); mypy checks the
three packages under their import names through ``.ci/typecheck/`` (see pyproject.toml).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.lint
ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, check=False
    )


def test_ruff_is_clean() -> None:
    done = _run("ruff", "check", "--no-cache", ".")
    assert done.returncode == 0, done.stdout + done.stderr


def test_mypy_is_clean() -> None:
    done = _run("mypy", "-p", "ckptd.daemon", "-p", "ckptd.client", "-p", "ckptd.protos")
    assert done.returncode == 0, done.stdout + done.stderr
