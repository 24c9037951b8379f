"""Shared-memory staging: the snapshot is written straight into a POSIX segment.

On the daemon's host the staging buffer *is* a shared-memory segment, so a save costs one
copy in the trainer (tensor → segment) and the daemon reads the bytes in place; only the
header crosses gRPC. Lifecycle, so nothing is left in ``/dev/shm``:

* the client creates each segment (``SharedMemory(create=True)``), which registers it
  with Python's ``resource_tracker``: if the trainer dies, even by SIGKILL, the tracker
  process unlinks it;
* it also holds a lock on each segment while it lives, so that when the tracker dies too
  (the whole process group killed) the next client or the daemon reclaims the orphan
  (``ckptd.protos.segments``); a client reclaims when it starts using shared memory;
* segments are reused across saves (they are pooled staging buffers);
* every page of a staging segment is allocated when it is created (``_reserve``), so a
  full ``/dev/shm`` (a container's is 64 MB by default) is a ``SharedMemoryFullError``
  there, on which ``transport="auto"`` streams over gRPC, never a SIGBUS in the copy;
* ``ShmBuffer.close`` unlinks the name first, then unmaps; a stray tensor view keeps
  the mapping valid (never a dangling pointer) until it dies;
* the daemon only opens and copies; it never unlinks.

A restore on the same host goes the other way (``RestoreSegment``): the client creates an
empty segment the same way, the daemon sizes it and writes the step into it, and the client
copies it out of a read-only mapping into its tensors, verifying the checksum as it
copies, then unlinks it; with ``zero_copy`` it maps it writable instead and returns views
of the mapping, whose memory goes with the last of them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Callable
from multiprocessing import shared_memory
from pathlib import Path

import numpy as np
import torch
from ckptd.protos import segments, streams
from ckptd.protos.v1 import pb

from .errors import SharedMemoryFullError
from .grpc_transport import Connection, encode_header
from .staging import PAGE_BYTES, Layout, StagingBuffer
from .transport import SaveTransport

logger = logging.getLogger("ckptd.client")

BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")


class ShmBuffer(StagingBuffer):
    """A staging buffer backed by a POSIX shared-memory segment the client owns."""

    def __init__(self, capacity: int, *, pinned: bool = False) -> None:
        self.segment = shared_memory.SharedMemory(
            name=segments.segment_name(), create=True, size=capacity
        )
        self.name = self.segment.name
        self._hold = segments.hold(self.name)
        try:
            _reserve(self.name, capacity)
        except BaseException:
            self._discard()
            raise
        # Through numpy, so every tensor view holds a buffer export of the mapping: the
        # mapping then cannot be unmapped under a live view (torch.frombuffer holds none).
        mapping = self.segment.buf
        assert mapping is not None
        array = np.frombuffer(mapping, dtype=np.uint8, count=capacity)
        super().__init__(torch.from_numpy(array))
        self._capacity = capacity
        self._pinned = pinned and _page_lock(self.data)

    @property
    def capacity(self) -> int:
        return self._capacity if self.segment is not None else 0

    def _discard(self) -> None:
        """Unlinks and closes a segment that was never mapped into a tensor."""
        with contextlib.suppress(FileNotFoundError):
            self.segment.unlink()
        if self._hold is not None:
            os.close(self._hold)
        self.segment.close()

    def close(self) -> None:
        """Unlinks the segment, then unmaps it (idempotent)."""
        segment = getattr(self, "segment", None)
        if segment is None:
            return
        if self._pinned:
            torch.cuda.cudart().cudaHostUnregister(self.data.data_ptr())
            self._pinned = False
        self.segment = None  # type: ignore[assignment]
        self.data = torch.empty(0, dtype=torch.uint8)
        with contextlib.suppress(FileNotFoundError):
            segment.unlink()
        if self._hold is not None:
            os.close(self._hold)  # after the unlink: never an unheld name in /dev/shm
            self._hold = None
        try:
            segment.close()
        except BufferError:
            # A tensor view of the mapping is still alive somewhere. Leave the mapping to
            # it — the memoryview and mmap are freed, and unmapped, with the last view —
            # and close only the descriptor. The name is already gone.
            segment._buf = None
            segment._mmap = None
            segment.close()


class RestoreSegment:
    """A segment the daemon writes a restore into (same host): created empty and owner-only,
    held and registered like a staging segment, and unlinked by ``close`` on every path;
    the daemon sizes it to the step. Use as a context manager.

    With ``zero_copy`` the restored tensors are views of a shared mapping of it
    (``streams.receive``), so its memory outlives ``close``: the name is gone and no
    descriptor is left, and the kernel frees the pages when the last of those tensors dies
    (unmapping it)."""

    def __init__(self) -> None:
        # A page: SharedMemory cannot create an empty segment; the daemon resizes it.
        self._segment: shared_memory.SharedMemory | None = shared_memory.SharedMemory(
            name=segments.segment_name(), create=True, size=PAGE_BYTES)
        self.name = self._segment.name
        self._hold = segments.hold(self.name)
        # Read-write and no-follow: what the restore reads from, or maps shared and writable.
        self._fd = None if self._hold is None else segments.open_no_follow(
            segments.SHM_ROOT / self.name, writable=True)

    @property
    def reference(self) -> streams.Segment | None:
        """The segment for ``streams.receive``; None where the host exposes no /dev/shm."""
        return None if self._fd is None else streams.Segment(self.name, self._fd)

    def close(self) -> None:
        """Unlinks the segment, then lets go of it (idempotent); mappings stay valid."""
        segment, self._segment = self._segment, None
        if segment is None:
            return
        with contextlib.suppress(FileNotFoundError):
            segment.unlink()
        for fd in (self._fd, self._hold):
            if fd is not None:
                os.close(fd)  # after the unlink: never an unheld name in /dev/shm
        self._fd = self._hold = None
        segment.close()

    def __enter__(self) -> RestoreSegment:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _reserve(name: str, capacity: int) -> None:
    """Allocates every page of a new segment now. ``SharedMemory`` only ``ftruncate``s, so
    tmpfs would allocate a page at the first write through the mapping, and on a full
    ``/dev/shm`` that write is a SIGBUS that kills the trainer; ``posix_fallocate`` fails
    with ENOSPC instead, before any byte is copied (``SharedMemoryFullError``)."""
    if not hasattr(os, "posix_fallocate"):  # not Linux: no /dev/shm to exhaust either
        return
    try:
        fd = segments.open_no_follow(segments.SHM_ROOT / name, writable=True)
    except OSError:
        return  # the host exposes no /dev/shm file to reserve (not Linux)
    try:
        os.posix_fallocate(fd, 0, capacity)
    except OSError as exc:
        raise SharedMemoryFullError(_no_room_message(capacity, exc)) from exc
    finally:
        os.close(fd)


def _no_room_message(capacity: int, exc: OSError) -> str:
    return (
        f"cannot reserve a {capacity}-byte shared-memory staging buffer: {exc.strerror} "
        f"({segments.describe_room()}); give the trainer's container a larger /dev/shm "
        "(docker run --shm-size, a Kubernetes emptyDir with medium: Memory), or save over gRPC "
        "(transport='grpc'; transport='auto' switches by itself)"
    )


def _page_lock(data: torch.Tensor) -> bool:
    """Registers the mapping with CUDA so device → host copies into it run as DMA, like
    into ``pin_memory`` buffers (best effort: an unpinned segment still works, slower)."""
    error = int(torch.cuda.cudart().cudaHostRegister(data.data_ptr(), data.numel(), 1))
    if error:
        logger.warning("could not page-lock shared memory for CUDA copies (cudaError %d)", error)
    return error == 0


def local_boot_id() -> str:
    """This machine's boot id ('' where the kernel does not expose one)."""
    try:
        return BOOT_ID_PATH.read_text().strip()
    except OSError:
        return ""


def same_host(server_hostname: str, server_boot_id: str) -> bool:
    """True when the daemon reports this machine's hostname and boot id, i.e. its
    ``/dev/shm`` is ours (a container or another boot would differ)."""
    boot_id = local_boot_id()
    return bool(boot_id) and server_boot_id == boot_id and server_hostname == socket.gethostname()


def is_unix_target(target: str) -> bool:
    """True for a unix socket: the only connection on which the daemon serves shared
    memory, since only there does it know the client's uid."""
    return target.startswith(("unix:", "unix-abstract:"))


def _report_skipped(name: str, kind: str) -> None:
    logger.warning("skipped %s in /dev/shm named like a client segment: %s", kind, name)


class ShmRoom:
    """Whether a checkpointer's next save or restore (``what``) asks for shared memory
    again after ``/dev/shm`` had no room for it: streaming is several times slower for a
    big state, so a transient full ``/dev/shm`` must not cost the rest of a long run, and
    one known to be too small must not be asked on every call either.

    After a refusal of ``nbytes`` the caller streams, and the size is remembered. While
    ``/dev/shm`` has less room free than that (one ``statvfs`` per call), ``worth_trying``
    says no; it says yes once the room is there, and in any case on every
    ``retry_every``-th call since the last try (a smaller state may fit, or the room may
    not be inspectable). A refusal with room to spare (a daemon that cannot open the
    segment) is worth trying every time, since the room says nothing about it.

    The caller warns once per condition: ``refused`` says whether this refusal starts one
    (False: refused again, log at debug level), ``served`` whether a call that went
    through shared memory ended one. Used from one thread (the trainer's)."""

    def __init__(
        self, what: str, retry_every: int,
        room: Callable[[], tuple[int, int] | None] = segments.room,
    ) -> None:
        self.what = what  # "save" or "restore", for the messages
        self.retry_every = retry_every
        self._room = room
        self.needed: int | None = None  # bytes the last refused call needed
        self._skipped = 0  # calls streamed without asking since the last try
        self._warned = False

    def worth_trying(self) -> bool:
        """Whether to ask for shared memory this time (else: stream)."""
        if self.needed is None:
            return True
        space = self._room()
        fits = space is not None and space[0] >= self.needed
        if fits or self._skipped + 1 >= self.retry_every:
            self._skipped = 0
            return True
        self._skipped += 1
        logger.debug("%s streams: /dev/shm has %s, the last refused %s needed %d bytes",
                     self.what, "no room to inspect" if space is None
                     else f"{space[0]} bytes free", self.what, self.needed)
        return False

    def refused(self, nbytes: int) -> bool:
        """Records that shared memory was refused for ``nbytes`` bytes (the call then
        streamed); True when this starts a condition to warn about."""
        space = self._room()
        self.needed = nbytes if space is not None and space[0] < nbytes else None
        self._skipped = 0
        first, self._warned = not self._warned, True
        return first

    def later(self) -> str:
        """What later calls do, for the caller's warning."""
        if self.needed is None:
            return f"later {self.what}s try shared memory again and stream when refused"
        return (f"later {self.what}s stream while /dev/shm has less than {self.needed} bytes "
                f"free (shared memory is tried again once it has, and every "
                f"{self.retry_every} {self.what}s)")

    def served(self) -> bool:
        """Records a call that went through shared memory; True when that ends a condition
        warned about."""
        ended = self._warned
        self.needed, self._skipped, self._warned = None, 0, False
        return ended


class ShmTransport(SaveTransport):
    """Hands the daemon a shared-memory segment instead of streaming bytes (same host)."""

    name = "shm"

    def __init__(self, connection: Connection, *, pin_memory: bool = False) -> None:
        self.connection = connection
        self.pin_memory = pin_memory
        reclaimed = segments.reclaim_orphans(on_skip=_report_skipped)
        if reclaimed:
            logger.info(
                "unlinked %d shared-memory segments left by dead trainers: %s",
                len(reclaimed),
                ", ".join(reclaimed),
            )

    def allocate(self, capacity: int) -> StagingBuffer:
        return ShmBuffer(capacity, pinned=self.pin_memory)

    def accepts(self, buffer: StagingBuffer) -> bool:
        """Only a segment: the daemon reads the bytes in place."""
        return isinstance(buffer, ShmBuffer)

    def send(self, header: pb.SaveHeader, buffer: StagingBuffer, layout: Layout) -> pb.SaveStatus:
        if not isinstance(buffer, ShmBuffer):
            raise TypeError(f"the shm transport needs a ShmBuffer, got {type(buffer).__name__}")
        with_ref = pb.SaveHeader()
        with_ref.CopyFrom(header)
        with_ref.shared_memory.CopyFrom(
            pb.SharedMemoryRef(
                segment_name=buffer.name, segment_bytes=buffer.capacity, offsets=layout.offsets
            )
        )
        operation = (
            f"save step {header.step} of run {header.run!r} rank {header.rank} via shared memory"
        )
        request = encode_header(with_ref)
        return self.connection.save(lambda: [request], operation)

    def cancel(self) -> None:
        self.connection.cancel_saves()
