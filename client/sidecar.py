"""A restore's second thread: fresh tensors faulted in ahead of the copy.

On the daemon's host the client's part of a restore was three steps, one after the other
(``bench/README.md``, "Where a same-host restore's time goes", 1 GiB): fault the fresh
tensors in (0.75 s, one ``MADV_POPULATE_WRITE`` per tensor), copy the segment into them and
hash it (0.54 s), then unmap and free the segment (0.24 s). Faulting in is kernel work that
releases the GIL and touches no byte the copy reads or writes, so one helper thread does it
while the main thread copies: it populates the tensors in table order (the order the daemon
announces them), a slice at a time; where the copy overtook it (populating is the slower of
the two), it leaves the copy the slice ahead of it and goes on past that, so the two fault
in different pages (one page populated twice would be harmless: the kernel faults it in
once). Streamed (gRPC) restores allocate the same way and get the same helper.

Call order: ``receive`` (``restore.py``) makes one per restore and uses it as a context
manager; ``add`` (each fresh tensor, in table order, as it is allocated) comes before the
copy, ``copied`` from the copying thread as it goes; leaving the ``with`` stops the thread
and joins it (after at most one slice's syscall), on success and on error alike, so no
thread outlives the restore. The helper only gives the kernel advice: where it falls behind
or the kernel refuses, the copy faults the pages in itself, as without it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .pages import MIN_POPULATED_BYTES, PAGE_BYTES, PagePopulator, page_span

# One syscall's worth: small enough that the helper looks at the copy's position often and
# stops promptly, large enough that the calls cost nothing.
SLICE_BYTES = 16 << 20

Job = Callable[[], bool]


@dataclass
class _Fresh:
    """A fresh tensor: its place in the restore's byte stream and its whole pages."""

    stream_start: int
    nbytes: int
    tensor: torch.Tensor  # kept referenced: its memory stays mapped while it is advised
    next_page: int  # address of the first page not yet populated
    end_page: int


class Plan:
    """What the helper does next, from the copy's progress: no thread, no lock (the
    sidecar holds its lock around every call)."""

    def __init__(self) -> None:
        self.populator = PagePopulator()
        self.fresh: list[_Fresh] = []
        self._next = 0  # index in fresh of the tensor being populated
        self._stream_bytes = 0
        self.copied = 0

    def add(self, tensor: torch.Tensor) -> bool:
        """Takes the next fresh tensor; returns whether it has pages to populate."""
        nbytes = tensor.numel() * tensor.element_size()
        wanted = nbytes >= MIN_POPULATED_BYTES and self.populator.enabled
        if wanted:
            start, end = page_span(tensor.data_ptr(), nbytes)
            self.fresh.append(_Fresh(self._stream_bytes, nbytes, tensor, start, end))
        self._stream_bytes += nbytes
        return wanted

    def next_job(self) -> Job | None:
        """The next slice to populate ahead of the copy, or None."""
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
        return None


class RestoreSidecar:
    """The helper thread of one restore (see the module docstring); a context manager."""

    def __init__(self) -> None:
        self._plan = Plan()
        self._wake = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def add(self, tensor: torch.Tensor) -> None:
        """A fresh tensor (in table order) the copy will write; populated ahead of it."""
        with self._wake:
            if self._plan.add(tensor):
                self._start()
                self._wake.notify()

    def copied(self, nbytes: int) -> None:
        """Progress of the copy (copied and checked), in stream bytes (``streams.Progress``)."""
        with self._wake:  # read by the helper as it plans; it never waits on progress
            self._plan.copied += nbytes

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
