"""Faulting in a restore's fresh tensors with one call per range, before the copy.

A restore writes every byte of tensors nobody touched yet, so the kernel faults their
memory in 4 KiB page by page: one trap, one zeroed page and one page-table entry at a time,
about as much work as the copy itself. ``MADV_POPULATE_WRITE`` (Linux 5.14) does the same
allocation in one call per range, without a trap per page (less CPU: ``bench/README.md``,
"Restore at torch.load speed?"). The memory is the tensor's own either way (allocated by
torch, freed with it; only whole pages inside the tensor are touched, and their bytes are
kept); a kernel without the flag (or another OS) refuses the advice, and the copy faults the
pages in as before.

It runs on the restore's second thread (``sidecar.py``), ahead of the copy.

Transparent huge pages (``MADV_HUGEPAGE``) were measured too and are not used: on the
development machine (a VM, THP in ``madvise`` mode) faulting 1 GiB of huge pages was
slower than 4 KiB pages in most runs (direct compaction), and faster only in some.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable

import torch

PAGE_BYTES = 4096
# Below this, a tensor's pages fault in faster than a syscall is made.
MIN_POPULATED_BYTES = 1 << 20
_MADV_POPULATE_WRITE = 23  # linux/mman.h, since 5.14


def page_span(address: int, nbytes: int) -> tuple[int, int]:
    """The whole pages inside ``[address, address + nbytes)``: ``(start, end)`` addresses,
    page-aligned, ``start >= end`` when there are none."""
    return -(-address // PAGE_BYTES) * PAGE_BYTES, (address + nbytes) // PAGE_BYTES * PAGE_BYTES


class PagePopulator:
    """Populates fresh memory ahead of a copy (Linux; a no-op elsewhere).

    One per restore: it looks ``madvise`` up once, and stops asking after the kernel
    refused once (an old kernel, a seccomp filter): the advice only changes speed."""

    def __init__(self) -> None:
        self._madvise = _libc("madvise", ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)

    @property
    def enabled(self) -> bool:
        """False once the kernel refused (or where there is no ``madvise``)."""
        return self._madvise is not None

    def populate(self, tensor: torch.Tensor) -> bool:
        """Faults in the whole pages inside ``tensor``'s memory, writable, before it is
        first written; returns whether the kernel did."""
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes < MIN_POPULATED_BYTES:
            return False
        return self.populate_pages(*page_span(tensor.data_ptr(), nbytes))

    def populate_pages(self, start: int, end: int) -> bool:
        """Faults in the pages ``[start, end)`` (page-aligned addresses of memory this
        process owns and keeps mapped meanwhile); returns whether the kernel did. Releases
        the GIL for the call (ctypes), so another thread may copy meanwhile."""
        if self._madvise is None or end <= start:
            return False
        if self._madvise(start, end - start, _MADV_POPULATE_WRITE) == 0:
            return True
        self._madvise = None
        return False


def _libc(name: str, *argtypes: type) -> Callable[..., int] | None:
    """``name`` from the C library, typed, or None where it is missing (or not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    function.argtypes = list(argtypes)
    function.restype = ctypes.c_int
    return function
