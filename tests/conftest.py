"""Shared fixtures: real daemons on port 0 with storage under ``tmp_path``.

* ``daemon``: an in-process daemon (own thread and loop) with ``.address``,
  ``.storage_path``, ``.stop()`` and ``.call(fn)`` (runs ``fn(engine)`` on its loop).
* ``unix_daemon``: the same on ``unix://{tmp_path}/ckptd.sock``, the only connection on
  which a daemon serves shared memory (it needs the client's uid);
* ``spawn_daemon``: ``spawn_daemon(storage_path, *extra_args, env=None)`` starts
  ``python -m ckptd.daemon.cli serve`` as a subprocess and returns a ``DaemonProcess``
  (``.address``, ``.pid``, ``.proc``, ``.terminate(timeout_s)``, ``.kill()``); every process
  still running at teardown is killed.

Two tiers: plain ``pytest`` runs the fast tier (unit and in-process integration tests) and
deselects the tests marked with one of ``FULL_SUITE_MARKERS`` (see pyproject.toml);
``pytest --all`` runs everything, as CI does. An explicit ``-m`` expression selects on its own.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
import torch
from ckptd.daemon import codec
from daemon_harness import (
    DaemonProcess,
    InProcessDaemon,
    SpawnDaemon,
    spawn,
    start_in_process,
)

FULL_SUITE_MARKERS = ("slow", "install", "bench", "lint")
_DESELECTED = pytest.StashKey[int]()


@pytest.fixture(autouse=True)
def _torch_threads_kept() -> Iterator[None]:
    """Each test starts with the process's torch thread count. The benchmarks a test runs
    in-process set it to 1 for bit-identical replays; leaked, that made a later test's
    in-process training differ from its subprocess half (``test_client_hf``'s exact resume,
    failed in the full suite only)."""
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--all", action="store_true", dest="full_suite",
        help=f"run the full suite: also the tests marked {', '.join(FULL_SUITE_MARKERS)}",
    )


def pytest_sessionstart(session: pytest.Session) -> None:
    # The codec's compiled kernels, once, before any test starts a daemon: on a checkout's
    # first run this compiles them into numba's cache (~10 s of CPU) instead of every
    # daemon subprocess compiling them at once; afterwards it loads them (~0.3 s).
    codec.warm_up()


def _fast_tier(config: pytest.Config) -> bool:
    return not config.getoption("full_suite") and not config.getoption("markexpr")


def pytest_report_header(config: pytest.Config) -> str | None:
    if config.getoption("full_suite"):
        return "full suite (--all)"
    if _fast_tier(config):
        return f"fast tier: {', '.join(FULL_SUITE_MARKERS)} deselected (--all runs everything)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not _fast_tier(config):
        return
    kept, deselected = [], []
    for item in items:
        full_only = any(item.get_closest_marker(name) for name in FULL_SUITE_MARKERS)
        (deselected if full_only else kept).append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = kept
    config.stash[_DESELECTED] = len(deselected)


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, config: pytest.Config
) -> None:
    deselected = config.stash.get(_DESELECTED, 0)
    if deselected:
        terminalreporter.write_line(
            f"fast tier: {deselected} tests marked {'/'.join(FULL_SUITE_MARKERS)} deselected; "
            "run everything with: python -m pytest --all"
        )


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[InProcessDaemon]:
    running = start_in_process(tmp_path / "storage")
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def unix_daemon(tmp_path: Path) -> Iterator[InProcessDaemon]:
    running = start_in_process(tmp_path / "storage", listen=f"unix://{tmp_path}/ckptd.sock")
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
