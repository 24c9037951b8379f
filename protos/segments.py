"""Client shared-memory segments: their names, and how anyone tells a live one from an orphan.

A trainer on the daemon's host stages each save in a POSIX segment it creates under
``/dev/shm`` (``ckptd.client.shm``). Python's resource tracker unlinks the segments of a
trainer that dies, but the tracker is a child in the trainer's process group: when the
whole group is killed (a scheduler's ``killpg``, a container's SIGKILL) nobody unlinks
them, and they hold host memory, the size of two staging buffers, until reboot.

So the creator also holds a shared ``flock`` on each segment for as long as the segment
is in use. The kernel drops the lock when the last descriptor of the creator (or of a child
it forked) closes, however the process ends; it works across containers that share the
``/dev/shm`` mount and across PID namespaces, where a pid would mean nothing. A segment with
this module's prefix that nobody holds and that is older than ``ORPHAN_AGE_S`` (so the
instant between creating and locking a segment never looks orphaned) is an orphan:
``reclaim_orphans`` unlinks it. Clients reclaim when they start using shared memory, the
daemon when it starts and then periodically. A mapping stays valid after the unlink, so a
late reader (the daemon copying the dead trainer's last save) is never cut off.

Stdlib only: the daemon imports it without torch.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import time
from pathlib import Path

SHM_ROOT = Path("/dev/shm")
SEGMENT_PREFIX = "ckptdc_"
ORPHAN_AGE_S = 60.0


def segment_name() -> str:
    """A fresh segment name; the creator's pid in it lets leak checks find the owner."""
    return f"{SEGMENT_PREFIX}{os.getpid()}_{secrets.token_hex(6)}"


def segment_owner(name: str) -> int | None:
    """The pid encoded in a client segment name, or None for other names."""
    if not name.startswith(SEGMENT_PREFIX):
        return None
    pid, _, _ = name[len(SEGMENT_PREFIX) :].partition("_")
    return int(pid) if pid.isdigit() else None


def hold(name: str, root: Path = SHM_ROOT) -> int | None:
    """Marks segment ``name`` as in use by this process until the returned descriptor is
    closed (or the process ends). None where ``root`` does not expose the segment as a file
    (not Linux): nothing is reclaimed there either."""
    try:
        fd = os.open(root / name, os.O_RDONLY)
    except OSError:
        return None
    fcntl.flock(fd, fcntl.LOCK_SH)
    return fd


def reclaim_orphans(root: Path = SHM_ROOT, min_age_s: float = ORPHAN_AGE_S) -> list[str]:
    """Unlinks client segments that no live process holds and that were created (or
    resized) at least ``min_age_s`` ago; returns their names. Segments it cannot open or
    unlink (another user's) are left alone."""
    try:
        names = [p.name for p in root.iterdir() if p.name.startswith(SEGMENT_PREFIX)]
    except OSError:
        return []
    reclaimed = []
    for name in names:
        path = root / name
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue  # gone meanwhile, or not ours to open
        try:
            if time.time() - os.fstat(fd).st_mtime < min_age_s:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live process holds it
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                reclaimed.append(name)
        except OSError:
            continue
        finally:
            os.close(fd)
    return reclaimed
