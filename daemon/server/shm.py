"""The daemon's side of shared-memory saves: copy tensors out of a client's segment.

The client creates, fills and unlinks a POSIX shared-memory segment; the daemon only opens
it read-only by name, copies every tensor into the save session, and closes it before it
answers ACCEPTED. The segment is opened through ``/dev/shm`` with ``os.open``/``mmap``
rather than ``multiprocessing.shared_memory``: on Python < 3.13 attaching with the latter
registers the segment with a resource tracker that would unlink the client's segment when
the daemon exits, and it maps the segment writable.

The daemon never unlinks a live client's segment, but it does reclaim orphans — segments
whose trainer died together with its resource tracker — before it serves and every
``RECLAIM_INTERVAL_S`` after (the rule is ``ckptd.protos.segments``).
"""

from __future__ import annotations

import asyncio
import mmap
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ckptd.daemon.domain import TensorSpec
from ckptd.daemon.errors import InvalidRequestError, SharedMemoryRefusedError
from ckptd.daemon.logs import fields, get_logger
from ckptd.protos import segments

if TYPE_CHECKING:
    from ckptd.daemon.engine.core import SaveSession

SHM_ROOT = segments.SHM_ROOT
RECLAIM_INTERVAL_S = 300.0

log = get_logger("shm")


def available() -> bool:
    """Whether this host exposes POSIX shared memory where the daemon looks for it."""
    return SHM_ROOT.is_dir()


def reclaim_orphans() -> None:
    """Unlinks client segments whose trainer died with its resource tracker (blocking)."""
    reclaimed = segments.reclaim_orphans(SHM_ROOT)
    if reclaimed:
        log.warning("unlinked shared memory left by dead trainers %s", fields(
            segments=len(reclaimed), names=",".join(reclaimed)))


async def reclaim_orphans_every(interval_s: float = RECLAIM_INTERVAL_S) -> None:
    """Runs ``reclaim_orphans`` off the loop every ``interval_s``, until cancelled."""
    while True:
        await asyncio.sleep(interval_s)
        await asyncio.to_thread(reclaim_orphans)


@dataclass(frozen=True)
class SegmentRef:
    """Transport-free copy of ``ckptd.v1.SharedMemoryRef``."""

    name: str
    segment_bytes: int
    offsets: tuple[int, ...]


def check_layout(ref: SegmentRef, tensors: Sequence[TensorSpec]) -> None:
    """Checks, before any budget is reserved, that every tensor lies inside the segment."""
    if not ref.name or "/" in ref.name or ref.name in (".", ".."):
        raise InvalidRequestError(
            f"shared memory segment name {ref.name!r} is invalid: give the shm_open name "
            "without slashes (Python's SharedMemory.name)"
        )
    if len(ref.offsets) != len(tensors):
        raise InvalidRequestError(
            f"shared memory segment {ref.name!r} lists {len(ref.offsets)} offsets for "
            f"{len(tensors)} tensors; give one offset per tensor"
        )
    for spec, offset in zip(tensors, ref.offsets, strict=True):
        if offset + spec.nbytes > ref.segment_bytes:
            raise InvalidRequestError(
                f"tensor {spec.name!r} at offset {offset} with {spec.nbytes} bytes ends past "
                f"the end of shared memory segment {ref.name!r} ({ref.segment_bytes} bytes)"
            )


def copy_into(session: SaveSession, ref: SegmentRef) -> None:
    """Copies every tensor of ``session``'s header out of the segment with ``fill_from``.

    Blocking (a memcpy of the whole checkpoint): the servicer runs it off the event loop.
    Raises ``SharedMemoryRefusedError`` naming the segment when the daemon cannot open it
    (the client should stream instead), ``InvalidRequestError`` when it is smaller than the
    reference claims.
    """
    try:
        fd = os.open(SHM_ROOT / ref.name, os.O_RDONLY)
    except FileNotFoundError:
        raise SharedMemoryRefusedError(
            f"shared memory segment {ref.name!r} does not exist on the daemon's host; "
            "is the client on another host or container? Send the bytes as chunks instead"
        ) from None
    except PermissionError:
        raise SharedMemoryRefusedError(
            f"shared memory segment {ref.name!r} is not readable by the daemon's user"
        ) from None
    try:
        actual = os.fstat(fd).st_size
        if actual < ref.segment_bytes:
            raise InvalidRequestError(
                f"shared memory segment {ref.name!r} holds {actual} bytes, "
                f"less than the {ref.segment_bytes} its reference claims"
            )
        if ref.segment_bytes == 0:
            for index in range(len(session.header.tensors)):
                session.fill_from(index, memoryview(b""))
            return
        with mmap.mmap(fd, ref.segment_bytes, prot=mmap.PROT_READ) as mapped:
            _copy_tensors(session, mapped, ref.offsets)
    finally:
        os.close(fd)


def _copy_tensors(session: SaveSession, mapped: mmap.mmap, offsets: Sequence[int]) -> None:
    # Every view into the mapping is released before it closes (else BufferError).
    with memoryview(mapped) as whole:
        for index, (spec, offset) in enumerate(zip(session.header.tensors, offsets, strict=True)):
            with whole[offset : offset + spec.nbytes] as view:
                session.fill_from(index, view)
