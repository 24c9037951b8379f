"""The daemon's side of shared memory: copy a save out of, or a restore into, a client's segment.

A restore through shared memory is the mirror image: the client creates an owner-only
segment and names it in ``RestoreRequest.shared_memory``; the daemon opens it read-write
with the same checks below (before any restore budget is reserved), sizes it with
``ftruncate`` to what the step needs (``size_for_restore``, from the tensor table: a step
rebuilt from storage is written while it is decoded; a ``/dev/shm`` without that much room
is refused there, before anything is decoded), answers the header with the offsets,
then writes the tensors with ``pwritev`` (``write_tensors``) as they come, sending
``segment_ready`` after each batch so that the client copies one batch while the next is
written; the last only once the daemon verified the step's checksum.
It never maps or unlinks the segment: the client unlinks it on every path, and a client
that dies leaves it to its resource tracker or the orphan sweep.

For a save, the client creates, fills and unlinks a POSIX shared-memory segment; the daemon
only opens it read-only by name, copies every tensor into the save session, and closes it before it
answers ACCEPTED. The segment's owner is not trusted, so:

* the name must be a plain shm_open name (``ckptd.protos.segments.name_problem``), and it is
  opened through ``/dev/shm`` with ``O_NOFOLLOW | O_NONBLOCK``: a symlink is refused, not
  followed, and a FIFO is opened without blocking and then refused;
* it must be a regular file owned by the connecting peer (``peer_uid``; None, as over TCP,
  refuses shared memory), so a client cannot make the daemon read another user's file;
* it is opened before the step and budget are reserved, so a refusal leaves nothing held;
* bytes are copied with ``preadv`` straight into the session's buffers, never through a
  mapping: a client that shrinks its segment (``ftruncate``) mid-copy makes a read come
  back short, which fails that save with INVALID_ARGUMENT, where touching a mapping past
  the new end would SIGBUS the whole daemon.

Every refusal is ``SharedMemoryRefusedError`` (reason ``SHARED_MEMORY_REFUSED``), on which a
client with ``transport="auto"`` streams instead.

The daemon never unlinks a live client's segment, but it does reclaim orphans — segments
whose trainer died together with its resource tracker — before it serves and every
``RECLAIM_INTERVAL_S`` after (the rule is ``ckptd.protos.segments``; entries that are not
regular files are skipped and logged once each).
"""

from __future__ import annotations

import asyncio
import errno
import functools
import os
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from ckptd.daemon.domain import TensorSpec
from ckptd.daemon.errors import InvalidRequestError, SharedMemoryRefusedError
from ckptd.daemon.logs import fields, get_logger
from ckptd.protos import segments

if TYPE_CHECKING:
    from ckptd.daemon.engine.core import SaveSession

SHM_ROOT = segments.SHM_ROOT
RECLAIM_INTERVAL_S = 300.0
# A restore announces progress after at least this many bytes: the client reads them while
# the daemon writes the next, and the messages stay few.
READY_BATCH_BYTES = 32 << 20
# One preadv moves at most this much (Linux caps a read near 2 GiB anyway).
_READ_BYTES = 1 << 30

log = get_logger("shm")


def available() -> bool:
    """Whether this host exposes POSIX shared memory where the daemon looks for it."""
    return SHM_ROOT.is_dir()


class OrphanSweeper:
    """Unlinks client segments whose trainer died with its resource tracker; reports each
    entry that is not a regular file (a FIFO or link named like a segment) once."""

    def __init__(self, root: Path = SHM_ROOT) -> None:
        self.root = root
        self._reported: set[str] = set()

    def sweep(self) -> list[str]:
        """One pass (blocking); returns the names unlinked."""
        reclaimed = segments.reclaim_orphans(self.root, on_skip=self._skipped)
        if reclaimed:
            log.warning("unlinked shared memory left by dead trainers %s", fields(
                segments=len(reclaimed), names=",".join(reclaimed)))
        return reclaimed

    async def sweep_every(self, interval_s: float = RECLAIM_INTERVAL_S) -> None:
        """Runs ``sweep`` off the loop every ``interval_s``, until cancelled."""
        while True:
            await asyncio.sleep(interval_s)
            await asyncio.to_thread(self.sweep)

    def _skipped(self, name: str, kind: str) -> None:
        if name not in self._reported:
            self._reported.add(name)
            log.warning("skipped a non-segment named like a client segment %s",
                        fields(name=name, kind=kind))


@dataclass(frozen=True)
class SegmentRef:
    """Transport-free copy of ``ckptd.v1.SharedMemoryRef``."""

    name: str
    segment_bytes: int
    offsets: tuple[int, ...]


def check_layout(ref: SegmentRef, tensors: Sequence[TensorSpec]) -> None:
    """Checks, before any budget is reserved, that every tensor lies inside the segment."""
    if (problem := segments.name_problem(ref.name)) is not None:
        raise InvalidRequestError(problem)
    if len(ref.offsets) != len(tensors):
        raise InvalidRequestError(
            f"shared memory segment {ref.name!r} lists {len(ref.offsets)} offsets for "
            f"{len(tensors)} tensors; give one offset per tensor"
        )
    for spec, offset in zip(tensors, ref.offsets, strict=True):
        if offset + spec.nbytes > ref.segment_bytes:
            raise InvalidRequestError(
                f"tensor {spec.name[:64]!r} at offset {offset} with {spec.nbytes} bytes ends "
                f"past the end of shared memory segment {ref.name!r} ({ref.segment_bytes} bytes)"
            )


class OpenSegment:
    """A client segment opened and checked by ``open_segment``; close it (or use ``with``)."""

    def __init__(self, ref: SegmentRef, fd: int) -> None:
        self.ref = ref
        self.fd = fd

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def __enter__(self) -> OpenSegment:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def open_segment(
    ref: SegmentRef, peer_uid: int | None, *, writable: bool = False
) -> OpenSegment:
    """Opens ``ref``'s segment for a client running as ``peer_uid`` (non-blocking;
    ``writable`` for a restore, which writes into it).

    Raises ``SharedMemoryRefusedError`` when the daemon may not read it (no peer uid, not
    on this host, a symlink, not a regular file, another user's), ``InvalidRequestError``
    when it is smaller than the reference claims.
    """
    if peer_uid is None:
        raise SharedMemoryRefusedError(
            f"shared memory segment {ref.name!r} refused: shared memory is served only to "
            "clients on the daemon's unix socket; send the bytes as chunks instead"
        )
    try:
        fd = segments.open_no_follow(SHM_ROOT / ref.name, writable=writable)
    except OSError as exc:
        raise SharedMemoryRefusedError(_open_failure(ref.name, exc)) from None
    try:
        _check_opened(ref, os.fstat(fd), peer_uid)
    except BaseException:
        os.close(fd)
        raise
    return OpenSegment(ref, fd)


def _open_failure(name: str, exc: OSError) -> str:
    if isinstance(exc, FileNotFoundError):
        return (f"shared memory segment {name!r} does not exist on the daemon's host; is the "
                "client on another host or container? Send the bytes as chunks instead")
    if isinstance(exc, PermissionError):
        return f"shared memory segment {name!r} is not accessible to the daemon's user"
    if os.path.islink(SHM_ROOT / name):
        return f"shared memory segment {name!r} is a symlink; the daemon does not follow links"
    return f"shared memory segment {name!r} cannot be opened: {exc.strerror}"


def _check_opened(ref: SegmentRef, st: os.stat_result, peer_uid: int) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise SharedMemoryRefusedError(
            f"shared memory segment {ref.name!r} is a {segments.file_kind(st.st_mode)}, not a "
            "segment; the daemon reads only regular files"
        )
    if st.st_uid != peer_uid:
        raise SharedMemoryRefusedError(
            f"shared memory segment {ref.name!r} is owned by uid {st.st_uid}, not by the "
            f"connecting client (uid {peer_uid}); the daemon reads only the caller's segments"
        )
    if st.st_size < ref.segment_bytes:
        raise InvalidRequestError(
            f"shared memory segment {ref.name!r} holds {st.st_size} bytes, "
            f"less than the {ref.segment_bytes} its reference claims"
        )


def copy_into(session: SaveSession, segment: OpenSegment) -> None:
    """Reads every tensor of ``session``'s header out of ``segment`` into its buffers.

    Blocking (a read of the whole checkpoint): the servicer runs it off the event loop.
    Raises ``InvalidRequestError`` naming the sizes when the segment is shorter than a
    tensor's end (the client shrank it after it was opened).
    """
    tensors = session.header.tensors
    for index, (spec, offset) in enumerate(zip(tensors, segment.ref.offsets, strict=True)):
        session.fill_with(index, functools.partial(_read_exactly, segment, offset, spec))


def _read_exactly(
    segment: OpenSegment, offset: int, spec: TensorSpec, target: memoryview
) -> None:
    done = 0
    while done < len(target):
        with target[done : done + _READ_BYTES] as window:
            got = os.preadv(segment.fd, [window], offset + done)
        if got == 0:
            raise InvalidRequestError(
                f"shared memory segment {segment.ref.name!r} ended at byte {offset + done} "
                f"while tensor {spec.name[:64]!r} needs bytes {offset}..{offset + spec.nbytes} "
                f"(the reference claims {segment.ref.segment_bytes}); it shrank during the copy"
            )
        done += got


def size_for_restore(segment: OpenSegment, sizes: Sequence[int]) -> SegmentRef:
    """Sizes a client's restore segment to hold tensors of ``sizes`` bytes, each at a
    64-byte-aligned offset; returns where they will lie (``write_tensors`` then fills them).
    Raises ``SharedMemoryRefusedError`` when the segment cannot be resized."""
    offsets, total = segments.aligned_offsets(list(sizes))
    try:
        # A /dev/shm without room refuses here, before the header and any decode (the
        # client then streams). Checked, not reserved: reserving every page would run on
        # the event loop and ahead of the writes it now overlaps; a /dev/shm filled
        # meanwhile still ends in ENOSPC from ``pwritev`` (``write_tensors``), never in a
        # fault, and the client reads only what was announced as written.
        space = segments.room()
        if space is not None and total > space[0]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        os.ftruncate(segment.fd, total)
    except OSError as exc:
        raise _no_room(segment, total, exc) from None
    return SegmentRef(segment.ref.name, total, offsets)


def ready_batches(sizes: Sequence[int], min_bytes: int = READY_BATCH_BYTES) -> list[int]:
    """Where to announce progress: the tensor counts after which at least ``min_bytes``
    more have been written (the last is ``len(sizes)``)."""
    ends, pending = [], 0
    for index, nbytes in enumerate(sizes):
        pending += nbytes
        if pending >= min_bytes or index == len(sizes) - 1:
            ends.append(index + 1)
            pending = 0
    return ends or [0]


def write_tensors(
    segment: OpenSegment, ref: SegmentRef,
    arrays: Sequence[np.ndarray] | Mapping[int, np.ndarray], span: range,
) -> None:
    """Writes the tensors at the indices ``span`` (keys of ``arrays``, or indices into it)
    into the segment at ``ref``'s offsets.

    Blocking: the servicer runs it off the event loop, batch by batch, and tells the client
    after each (``segment_ready``) so that it reads one batch while the next is written.
    ``pwritev`` from the arrays is the restore's one copy in the daemon, never through a
    mapping the client could shrink under it (a write past a shrunken end grows the file
    again). Raises ``SharedMemoryRefusedError`` when the host has no room for the segment.
    """
    try:
        for index in span:
            # reshape(-1) keeps 0-d arrays viewable; the arrays are C-contiguous by contract.
            with arrays[index].reshape(-1).data.cast("B") as raw:
                _write_all(segment.fd, raw, ref.offsets[index])
    except OSError as exc:
        raise _no_room(segment, ref.segment_bytes, exc) from None


def _no_room(segment: OpenSegment, total: int, exc: OSError) -> SharedMemoryRefusedError:
    return SharedMemoryRefusedError(
        f"shared memory segment {segment.ref.name!r} cannot hold the restored {total} "
        f"bytes: {exc.strerror} ({segments.describe_room()}); free memory in /dev/shm or "
        "give it more room (docker run --shm-size), or restore over the stream "
        "(transport='grpc')"
    )


def _write_all(fd: int, raw: memoryview, offset: int) -> None:
    done = 0
    while done < len(raw):
        with raw[done : done + _READ_BYTES] as window:
            done += os.pwritev(fd, [window], offset + done)
