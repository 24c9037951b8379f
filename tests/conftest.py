"""Shared fixtures: real daemons on port 0 with storage under ``tmp_path``.

* ``daemon``: an in-process daemon (own thread and loop) with ``.address``,
  ``.storage_path``, ``.stop()`` and ``.call(fn)`` (runs ``fn(engine)`` on its loop).
* ``spawn_daemon``: ``spawn_daemon(storage_path, *extra_args, env=None)`` starts
  ``python -m ckptd.daemon.cli serve`` as a subprocess and returns a ``DaemonProcess``
  (``.address``, ``.pid``, ``.proc``, ``.terminate(timeout_s)``, ``.kill()``); every process
  still running at teardown is killed.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
from daemon_harness import (
    DaemonProcess,
    InProcessDaemon,
    SpawnDaemon,
    spawn,
    start_in_process,
)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[InProcessDaemon]:
    running = start_in_process(tmp_path / "storage")
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def spawn_daemon(tmp_path: Path) -> Iterator[SpawnDaemon]:
    started: list[DaemonProcess] = []

    def factory(
        storage_path: Path, *extra_args: str, env: Mapping[str, str] | None = None
    ) -> DaemonProcess:
        process = spawn(storage_path, tmp_path / "daemon-run", extra_args, env)
        started.append(process)
        return process

    try:
        yield factory
    finally:
        for process in started:
            process.kill()
