"""Faulting in a restore's fresh tensors with one call each, before the copy.

A restore writes every byte of tensors nobody touched yet, so the kernel faults their
memory in 4 KiB page by page: one trap, one zeroed page and one page-table entry at a time,
about as much work as the copy itself. ``MADV_POPULATE_WRITE`` (Linux 5.14) does the same
allocation in one call per tensor, without a trap per page (less CPU: ``bench/README.md``,
"Restore at torch.load speed?"), and on the shared-memory path the client does it while
the daemon writes the first batches. The memory is the tensor's own either way (allocated
by torch, freed with it; only whole pages inside the tensor are touched, and their bytes
are kept); a kernel without the flag (or another OS) refuses the advice, and the copy
faults the pages in as before.

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

Madvise = Callable[[int, int, int], int]


class PagePopulator:
    """Populates fresh tensors' memory ahead of a copy (Linux; a no-op elsewhere).

    One per restore: it looks ``madvise`` up once, and stops asking after the kernel
    refused once (an old kernel, a seccomp filter): the advice only changes speed."""

    def __init__(self) -> None:
        self._madvise = _libc_madvise() if sys.platform.startswith("linux") else None

    def populate(self, tensor: torch.Tensor) -> bool:
        """Faults in the whole pages inside ``tensor``'s memory, writable, before it is
        first written; returns whether the kernel did."""
        nbytes = tensor.numel() * tensor.element_size()
        if self._madvise is None or nbytes < MIN_POPULATED_BYTES:
            return False
        start = -(-tensor.data_ptr() // PAGE_BYTES) * PAGE_BYTES
        end = (tensor.data_ptr() + nbytes) // PAGE_BYTES * PAGE_BYTES
        if self._madvise(start, end - start, _MADV_POPULATE_WRITE) == 0:
            return True
        self._madvise = None
        return False


def _libc_madvise() -> Madvise | None:
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise
