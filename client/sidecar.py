"""A restore's second thread: fresh tensors faulted in ahead of the copy, the segment
released behind it.

On the daemon's host the client's part of a restore was three steps, one after the other
(``bench/README.md``, "Where a same-host restore's time goes", 1 GiB): fault the fresh
tensors in (0.75 s, one ``MADV_POPULATE_WRITE`` per tensor), copy the segment into them and
hash it (0.54 s), then unmap the segment and free its tmpfs pages (most of a 0.24 s tail).
Faulting in and freeing are kernel work that releases the GIL and touches no byte the copy
reads or writes, so one helper thread does them while the main thread copies:

* **ahead**: it populates the tensors in table order (the order the daemon announces them),
  a slice at a time; where the copy overtook it (populating is the slower of the two), it
  leaves the copy the slice ahead of it and goes on past that, so the two fault in
  different pages (one page populated twice would be harmless: the kernel faults it in
  once);
* **behind**: once the daemon has written the whole segment (its last ``segment_ready``;
  a punch and the daemon's writes take the same inode lock, so punching earlier slowed
  both sides in ``bench/restore_timeline.py``) and when it has nothing to populate ahead of
  the copy, it punches the segment's whole pages the copy has finished out of the file
  (``copied`` is reported after each block is copied *and* hashed), so the tail has almost
  nothing left to unmap or free. Only a segment the tensors are copied out of: never
  one whose views are returned (``zero_copy``).

Call order: ``receive`` (``restore.py``) makes one per restore and uses it as a context
manager; ``segment`` (from the header, when the daemon wrote into the client's segment) and
``add`` (each fresh tensor, in table order, as it is allocated) come before the copy,
``copied`` from the copying thread as it goes, ``written`` when the last batch is
announced; leaving the ``with`` stops the thread and joins it (after at most one slice's
syscall), on success and on error alike, so no thread outlives the restore. The helper only
gives the kernel advice: where it falls behind or the kernel refuses, the copy faults pages
in itself and closing the segment frees the rest, as without it.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .pages import MIN_POPULATED_BYTES, PAGE_BYTES, HolePuncher, PagePopulator, page_span

# One syscall's worth: small enough that the helper looks at the copy's position often and
# stops promptly, large enough that the calls cost nothing.
SLICE_BYTES = 16 << 20
# The least the copy must have finished before a punch is worth a call.
MIN_RELEASE_BYTES = 4 << 20

Job = Callable[[], bool]


@dataclass
class _Fresh:
    """A fresh tensor: its place in the restore's byte stream and its whole pages."""

    stream_start: int
    nbytes: int
    tensor: torch.Tensor  # kept referenced: its memory stays mapped while it is advised
    next_page: int  # address of the first page not yet populated
    end_page: int


class _Layout:
    """Where the stream's bytes lie in the segment, for what may be released: tensors at
    increasing, non-overlapping offsets (what the daemon writes; anything else releases
    nothing)."""

    def __init__(self, fd: int, offsets: Sequence[int], sizes: Sequence[int]) -> None:
        self.fd = fd
        self.offsets, self.sizes = list(offsets), list(sizes)
        self.starts = [0] * len(sizes)
        for index in range(1, len(sizes)):
            self.starts[index] = self.starts[index - 1] + self.sizes[index - 1]
        self.usable = len(self.offsets) == len(sizes) and all(
            offset >= 0 for offset in self.offsets) and all(
            self.offsets[i] + self.sizes[i] <= self.offsets[i + 1] for i in range(len(sizes) - 1))
        self.released = 0  # the segment is free below this offset

    def finished_until(self, copied: int) -> int:
        """The segment offset below which every byte was copied (``copied`` bytes of the
        stream), rounded down to a page."""
        index = bisect.bisect_left(self.starts, copied) - 1
        if index < 0:
            return 0
        done = min(copied - self.starts[index], self.sizes[index])
        return (self.offsets[index] + done) // PAGE_BYTES * PAGE_BYTES


class Plan:
    """What the helper does next, from the copy's progress: no thread, no lock (the
    sidecar holds its lock around every call)."""

    def __init__(self) -> None:
        self.populator = PagePopulator()
        self.puncher = HolePuncher()
        self.fresh: list[_Fresh] = []
        self._next = 0  # index in fresh of the tensor being populated
        self._stream_bytes = 0
        self.copied = 0
        self.layout: _Layout | None = None
        self.written = False  # the daemon wrote the whole segment (its last announcement)

    def add(self, tensor: torch.Tensor) -> bool:
        """Takes the next fresh tensor; returns whether it has pages to populate."""
        nbytes = tensor.numel() * tensor.element_size()
        wanted = nbytes >= MIN_POPULATED_BYTES and self.populator.enabled
        if wanted:
            start, end = page_span(tensor.data_ptr(), nbytes)
            self.fresh.append(_Fresh(self._stream_bytes, nbytes, tensor, start, end))
        self._stream_bytes += nbytes
        return wanted

    def segment(self, fd: int, offsets: Sequence[int], sizes: Sequence[int]) -> bool:
        """Takes the segment's layout; returns whether it can be released."""
        layout = _Layout(fd, offsets, sizes)
        if layout.usable and self.puncher.enabled:
            self.layout = layout
        return self.layout is not None

    def next_job(self) -> Job | None:
        """The next slice to populate ahead of the copy, else the next range to punch
        behind it, else None."""
        while self._next < len(self.fresh) and self.populator.enabled:
            fresh = self.fresh[self._next]
            reached = fresh.tensor.data_ptr() + max(0, self.copied - fresh.stream_start)
            start = fresh.next_page
            if reached > start:  # the copy overtook: leave it its next slice, go past it
                start = -(-reached // PAGE_BYTES) * PAGE_BYTES + SLICE_BYTES
            if start >= fresh.end_page:
                self._next += 1
                continue
            end = min(start + SLICE_BYTES, fresh.end_page)
            fresh.next_page = end
            return lambda: self.populator.populate_pages(start, end)
        layout = self.layout
        if layout is None or not self.written or not self.puncher.enabled:
            return None
        target = layout.finished_until(self.copied)
        if target - layout.released < MIN_RELEASE_BYTES:
            return None
        offset = layout.released
        nbytes = min(target - offset, SLICE_BYTES)
        layout.released = offset + nbytes
        return lambda: self.puncher.punch(layout.fd, offset, nbytes)


class RestoreSidecar:
    """The helper thread of one restore (see the module docstring); a context manager."""

    def __init__(self) -> None:
        self._plan = Plan()
        self._wake = threading.Condition()
        self._stopping = False
        self._told = 0  # the copy's progress when the thread was last woken for it
        self._thread: threading.Thread | None = None

    def add(self, tensor: torch.Tensor) -> None:
        """A fresh tensor (in table order) the copy will write; populated ahead of it."""
        with self._wake:
            if self._plan.add(tensor):
                self._start()

    def segment(self, fd: int, offsets: Sequence[int], sizes: Sequence[int]) -> None:
        """The segment the stream is copied out of (a descriptor open for writing), with
        each tensor's offset and size: released behind the copy."""
        with self._wake:
            if self._plan.segment(fd, offsets, sizes):
                self._start()

    def written(self) -> None:
        """The daemon has written the whole segment: releasing may start (a punch takes
        the segment's inode lock, which the daemon's writes take too)."""
        with self._wake:
            self._plan.written = True
            self._wake.notify()

    def copied(self, nbytes: int) -> None:
        """Progress of the copy (copied and checked), in stream bytes (``streams.Progress``)."""
        with self._wake:
            self._plan.copied += nbytes
            # Only a release waits on progress, and it waits for MIN_RELEASE_BYTES of it.
            if self._plan.copied - self._told >= MIN_RELEASE_BYTES:
                self._told = self._plan.copied
                self._wake.notify()

    def close(self) -> None:
        """Stops the helper and joins it (idempotent)."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._plan.fresh.clear()

    def __enter__(self) -> RestoreSidecar:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _start(self) -> None:
        if self._thread is None and not self._stopping:
            self._thread = threading.Thread(target=self._run, name="ckptd-restore-sidecar",
                                            daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            with self._wake:
                job = self._plan.next_job()
                while job is None and not self._stopping:
                    self._wake.wait()
                    job = self._plan.next_job()
                if self._stopping:
                    return
            assert job is not None
            job()  # outside the lock: the syscall releases the GIL, the copy goes on
