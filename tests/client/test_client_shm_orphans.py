"""Shared-memory segments of a trainer killed with its whole process group (resource tracker
included) are reclaimed by the next client and by the daemon; live segments never are."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from ckptd.client.shm import ShmBuffer
from ckptd.protos import segments
from client_support import CheckpointerFactory
from daemon_harness import InProcessDaemon, start_in_process

OLD_S = segments.ORPHAN_AGE_S + 60


def age(path: Path, seconds: float = OLD_S) -> None:
    """Sets the segment's modification time ``seconds`` back."""
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_reclaim_takes_only_old_unheld_client_segments(tmp_path: Path) -> None:
    names = ["ckptdc_1_orphan", "ckptdc_2_held", "ckptdc_3_young", "psm_4_foreign"]
    for name in names:
        (tmp_path / name).write_bytes(b"x" * 64)
        if name != "ckptdc_3_young":
            age(tmp_path / name)
    held = segments.hold("ckptdc_2_held", tmp_path)
    assert held is not None

    assert segments.reclaim_orphans(tmp_path) == ["ckptdc_1_orphan"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[1:])
    os.close(held)  # the holder is gone: now it is an orphan too
    assert segments.reclaim_orphans(tmp_path) == ["ckptdc_2_held"]
    assert segments.hold("ckptdc_9_missing", tmp_path) is None


ORPHANING_TRAINER = """
import time
from ckptd.client.shm import ShmBuffer
buffers = [ShmBuffer(1 << 16) for _ in range(2)]
print(" ".join(b.name for b in buffers), flush=True)
time.sleep(600)
"""


@pytest.fixture
def orphans() -> Iterator[list[Path]]:
    """Segments of a trainer whose process group was SIGKILLed (its resource tracker too),
    aged past ``ORPHAN_AGE_S``."""
    trainer = subprocess.Popen(
        [sys.executable, "-c", ORPHANING_TRAINER],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a scheduler would start it
    )
    assert trainer.stdout is not None
    paths = [segments.SHM_ROOT / name for name in trainer.stdout.readline().split()]
    os.killpg(trainer.pid, signal.SIGKILL)
    trainer.wait(30)
    trainer.stdout.close()
    assert len(paths) == 2 and all(p.exists() for p in paths), "nothing was orphaned"
    for path in paths:
        age(path)
    try:
        yield paths
    finally:
        for path in paths:
            path.unlink(missing_ok=True)


@pytest.fixture
def live_segment() -> Iterator[ShmBuffer]:
    """A segment this process is using, as old as the orphans."""
    buffer = ShmBuffer(4096)
    age(segments.SHM_ROOT / buffer.name)
    try:
        yield buffer
    finally:
        buffer.close()


def test_a_starting_client_reclaims_orphans_and_keeps_live_segments(
    daemon: InProcessDaemon,
    make_checkpointer: CheckpointerFactory,
    orphans: list[Path],
    live_segment: ShmBuffer,
) -> None:
    # The daemon reclaimed before it served, before these were orphaned: this is the client.
    ckpt = make_checkpointer(daemon.address, "after-crash", transport="shm")
    assert not any(p.exists() for p in orphans)
    assert (segments.SHM_ROOT / live_segment.name).exists()
    ckpt.save(1, {"w": torch.arange(10.0)}).wait_durable(timeout=60)
    assert ckpt.steps() == [1]


def test_the_daemon_reclaims_orphans_before_it_serves(
    tmp_path: Path, orphans: list[Path], live_segment: ShmBuffer
) -> None:
    started = start_in_process(tmp_path / "storage")
    try:
        assert not any(p.exists() for p in orphans)
        assert (segments.SHM_ROOT / live_segment.name).exists()
    finally:
        started.stop()


def test_the_daemon_keeps_reclaiming_while_it_serves(
    orphans: list[Path], live_segment: ShmBuffer
) -> None:
    """The periodic pass, at a short interval instead of ``RECLAIM_INTERVAL_S``."""
    from ckptd.daemon.server import shm as daemon_shm

    async def gone() -> None:
        while any(p.exists() for p in orphans):
            await asyncio.sleep(0.01)

    async def reclaim_until_gone() -> None:
        reclaimer = asyncio.create_task(daemon_shm.OrphanSweeper().sweep_every(0.01))
        try:
            await asyncio.wait_for(gone(), timeout=30)
        finally:
            reclaimer.cancel()

    asyncio.run(reclaim_until_gone())
    assert (segments.SHM_ROOT / live_segment.name).exists()
