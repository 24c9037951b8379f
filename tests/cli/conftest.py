"""CLI fixtures: a daemon holding a few small runs, and the two ways to reach them.

``store`` saves, through the real client, run ``alpha`` (ranks 0 and 1, steps 1-3: a
base, then deltas) and run ``beta`` (rank 0, steps 10 and 20). ``source`` is parametrized:
``--target`` the daemon, or ``--storage`` its directory with the daemon stopped first
(direct storage access is meant for when no daemon serves it). ``cli`` runs ``main()``
in-process and returns (exit code, stdout, stderr).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from ckptd.client import Checkpointer
from ckptd.daemon.cli import main
from cli_support import RUNS, CliRunner, Store, make_state
from daemon_harness import start_in_process


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    daemon = start_in_process(tmp_path / "storage")
    restored = {}
    try:
        for (run, rank), steps in RUNS.items():
            with Checkpointer(daemon.address, run, rank, transport="grpc") as ckpt:
                for step in steps:
                    ckpt.save(step, make_state(step, rank))
                ckpt.wait(60)
                restored.update({(run, rank, step): ckpt.restore(step) for step in steps})
        yield Store(daemon, tmp_path / "storage", restored)
    finally:
        daemon.stop()


@pytest.fixture(params=["daemon", "storage"])
def source(request: pytest.FixtureRequest, store: Store) -> list[str]:
    """CLI arguments naming where the checkpoints are."""
    if request.param == "daemon":
        return ["--target", store.daemon.address]
    store.daemon.stop()
    return ["--storage", str(store.storage_path)]


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> CliRunner:
    def run(*argv: str, environ: dict[str, str] | None = None) -> tuple[int, str, str]:
        code = main(list(argv), environ or {})
        out, err = capsys.readouterr()
        return code, out, err

    return run
