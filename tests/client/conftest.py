"""Client test fixtures: a daemon on a unix socket (the only connection on which it serves
shared memory), checkpointers closed at teardown, and a session-wide check that no client
shared-memory segment outlives its owner (after close, or after a crash)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
from ckptd.client import Checkpointer
from ckptd.protos.segments import segment_owner
from client_support import SHM_DIR, CheckpointerFactory, client_segments
from daemon_harness import InProcessDaemon, wait_until


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def orphaned_segments(ignore: set[str]) -> list[str]:
    """Client segments left by this process or by processes that are gone (a crashed
    trainer's resource tracker unlinks them shortly after it dies)."""
    found = []
    for name in client_segments() - ignore:
        owner = segment_owner(name)
        if owner is not None and (owner == os.getpid() or not _alive(owner)):
            found.append(name)
    return found


@pytest.fixture(scope="session", autouse=True)
def no_shared_memory_left_behind() -> Iterator[None]:
    before = client_segments()
    yield
    wait_until(
        lambda: not orphaned_segments(before),
        timeout_s=30,
        what=f"client shared-memory segments to disappear from {SHM_DIR}",
    )


@pytest.fixture
def daemon(unix_daemon: InProcessDaemon) -> InProcessDaemon:
    """Client tests talk to the daemon over its unix socket, as a trainer on its host does."""
    return unix_daemon


@pytest.fixture
def make_checkpointer() -> Iterator[CheckpointerFactory]:
    """``make_checkpointer(target, run, **kwargs)``; every checkpointer is closed at the end."""
    made: list[Checkpointer] = []

    def factory(target: str, run: str, **kwargs: Any) -> Checkpointer:
        kwargs.setdefault("connect_timeout_s", 30.0)
        checkpointer = Checkpointer(target, run, **kwargs)
        made.append(checkpointer)
        return checkpointer

    yield factory
    for checkpointer in made:
        checkpointer.close()
