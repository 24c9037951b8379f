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

Anyone on the host can create a file in ``/dev/shm`` named like a segment, so nothing here
follows a name blindly: entries are ``lstat``-ed first and opened with ``O_NOFOLLOW |
O_NONBLOCK`` (``open_no_follow``), and a FIFO, symlink, socket or directory is skipped,
never opened (opening a FIFO for reading would block until a writer comes).

Stdlib only: the daemon imports it without torch.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
import stat
import time
from collections.abc import Callable, Sequence
from pathlib import Path

SHM_ROOT = Path("/dev/shm")
SEGMENT_PREFIX = "ckptdc_"
ORPHAN_AGE_S = 60.0
# What a shm_open name may be: one path segment, no '/', never '.' or '..' (shm_open's own
# limit is NAME_MAX, 255 bytes).
_SEGMENT_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,254}")
_OPEN_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
# Tensors in a segment start at multiples of this, so any dtype view of one is aligned.
ALIGN_BYTES = 64

SkipHook = Callable[[str, str], None]
"""Called with (name, kind) for an entry a sweep skipped because it is not a regular file."""


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a segment under ``SHM_ROOT`` (a path trick), or None."""
    if _SEGMENT_NAME.fullmatch(name):
        return None
    shown = name if len(name) <= 64 else f"{name[:64]}..."
    return (
        f"shared memory segment name {shown!r} is invalid: give the shm_open name without "
        "slashes (Python's SharedMemory.name), 1-255 of [A-Za-z0-9._-], not starting with '.'"
    )


def open_no_follow(path: Path, *, writable: bool = False) -> int:
    """Opens ``path`` read-only (or read-write) without following a symlink (``ELOOP``) or
    blocking on a FIFO, never creating it; the caller checks ``fstat`` before using it.
    Raises ``OSError``."""
    return os.open(path, _OPEN_FLAGS | (os.O_RDWR if writable else os.O_RDONLY))


def room(root: Path = SHM_ROOT) -> tuple[int, int] | None:
    """(free, total) bytes of the filesystem holding the segments, as an unprivileged
    writer sees it; None where it cannot be inspected."""
    try:
        fs = os.statvfs(root)
    except OSError:
        return None
    return fs.f_bavail * fs.f_frsize, fs.f_blocks * fs.f_frsize


def describe_room(root: Path = SHM_ROOT) -> str:
    """``room`` for an error message: what a user sizing ``root`` needs to know."""
    space = room(root)
    if space is None:
        return f"{root} cannot be inspected"
    return f"{space[0]} bytes free of {space[1]} in {root}"


def aligned_offsets(sizes: Sequence[int]) -> tuple[tuple[int, ...], int]:
    """Places byte ``sizes`` back to back, each at a multiple of ``ALIGN_BYTES``; returns
    their offsets and the bytes they span."""
    offsets = []
    cursor = 0
    for size in sizes:
        offsets.append(cursor)
        cursor += -(-size // ALIGN_BYTES) * ALIGN_BYTES
    return tuple(offsets), cursor


def file_kind(mode: int) -> str:
    """A word for a file type, for messages: 'regular file', 'FIFO', 'symlink', ..."""
    for test, kind in ((stat.S_ISREG, "regular file"), (stat.S_ISFIFO, "FIFO"),
                       (stat.S_ISLNK, "symlink"), (stat.S_ISDIR, "directory"),
                       (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device")):
        if test(mode):
            return kind
    return "special file"


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
        fd = open_no_follow(root / name)
    except OSError:
        return None
    fcntl.flock(fd, fcntl.LOCK_SH)
    return fd


def reclaim_orphans(
    root: Path = SHM_ROOT, min_age_s: float = ORPHAN_AGE_S, on_skip: SkipHook | None = None
) -> list[str]:
    """Unlinks client segments that no live process holds and that were created (or
    resized) at least ``min_age_s`` ago; returns their names. Segments it cannot open or
    unlink (another user's) are left alone; entries that are not regular files are never
    opened, only reported to ``on_skip``."""
    try:
        names = [p.name for p in root.iterdir() if p.name.startswith(SEGMENT_PREFIX)]
    except OSError:
        return []
    reclaimed = []
    for name in names:
        if _reclaim_one(root / name, min_age_s, on_skip):
            reclaimed.append(name)
    return reclaimed


def _reclaim_one(path: Path, min_age_s: float, on_skip: SkipHook | None) -> bool:
    try:
        mode = os.lstat(path).st_mode
        if not stat.S_ISREG(mode):
            if on_skip is not None:
                on_skip(path.name, file_kind(mode))
            return False
        fd = open_no_follow(path)
    except OSError:
        return False  # gone meanwhile, swapped for a link, or not ours to open
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or time.time() - st.st_mtime < min_age_s:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # a live process holds it
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            return True
        return False
    except OSError:
        return False
    finally:
        os.close(fd)
