"""The dependency rules of docs/ARCHITECTURE.md hold: import-linter checks pyproject.toml's
contracts.

The codec imports nothing else of ckptd, nor asyncio; the engine and the store never import
gRPC; the client and the daemon import nothing of each other (but the export's unflatten);
the daemon's layers run cli, server > engine > store > storage; gRPC is imported by a named
list of modules. A broken contract fails here with import-linter's report (the chain of
imports that breaks it).

``.ci/typecheck/`` goes first on ``PYTHONPATH`` (the layout mypy uses) so that grimp reads
this checkout's sources under their import names, whatever else is installed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = "from importlinter.cli import lint_imports_command; lint_imports_command()"


def test_import_contracts_are_kept() -> None:
    path = [str(ROOT / ".ci" / "typecheck"), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, path))}
    done = subprocess.run(
        [sys.executable, "-c", LINT_IMPORTS, "--no-cache"],
        cwd=ROOT, env=env, capture_output=True, text=True, check=False, timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout, done.stdout
