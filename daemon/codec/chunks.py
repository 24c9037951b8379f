"""Chunking and the per-call thread pool that runs chunks on several cores.

Tensors are processed in chunks of ``CHUNK_ELEMS`` elements: temporaries stay a few MiB
whatever the tensor size (peak memory is the tensor's own buffers plus that), and chunks are
independent units of work. numpy's element-wise kernels and zstd release the GIL, so plain
threads scale. The pool lives for one call only: no global state, nothing left running.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import numpy as np

# 256 Ki elements (1 MiB of float32): a chunk's temporaries (~6 MiB) stay in the CPU caches
# between the several passes over it (measured ~1.5x faster than 1 Mi), while numpy's
# per-call overhead stays below 2% of the work.
CHUNK_ELEMS = 1 << 18
# More threads than this buy nothing against memory bandwidth, and the daemon already runs
# several codec calls at once.
MAX_THREADS = 4
# Outputs at least this large decline transparent huge pages (see ``empty_output``).
SMALL_PAGES_MIN_BYTES = 16 << 20
_MADV_NOHUGEPAGE = 15  # linux/mman.h
_MADV_POPULATE_WRITE = 23  # linux/mman.h, since 5.14
_PAGE_BYTES = mmap.PAGESIZE

T = TypeVar("T")
R = TypeVar("R")
Mapper = Callable[[Callable[[T], R], Sequence[T]], list[R]]


def bounds(count: int, chunk_elems: int) -> list[slice]:
    """The element slices of the chunks of a tensor of ``count`` elements."""
    return [slice(i, min(i + chunk_elems, count)) for i in range(0, count, chunk_elems)]


def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@contextmanager
def mapper(nchunks: int) -> Iterator[Mapper]:
    """Yields ``map(fn, items) -> list`` running on up to ``MAX_THREADS`` threads.

    Results come back in item order, so anything merged from them is deterministic.
    """
    workers = min(nchunks, MAX_THREADS, _available_cpus())
    if workers <= 1:
        yield lambda fn, items: [fn(item) for item in items]
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="ckptd-codec") as pool:
        yield lambda fn, items: list(pool.map(fn, items))


def empty_output(count: int, dtype: np.dtype) -> np.ndarray:
    """``np.empty`` for a call's tensor-sized output, on small pages when it is large.

    numpy asks for transparent huge pages on big buffers. On VMs with free page reporting
    (Firecracker, most clouds: this bench machine) a fresh huge page is backed by the host
    at first touch, 512 host faults each: measured 0.9 s of system time to first write
    400 MB, against 0.15 s with 4 KiB pages (and 0.03 s for huge pages recycled in the
    guest). The output is written once, streaming, so huge pages buy no TLB benefit worth
    that risk; zstd's own output buffers use small pages too. Advice only: on failure, or
    off Linux, the buffer is the plain ``np.empty``.
    """
    out = np.empty(count, dtype)
    if out.nbytes >= SMALL_PAGES_MIN_BYTES:
        _advise(out, _MADV_NOHUGEPAGE)
    return out


def given_output(out: np.ndarray, holder: np.dtype, count: int,
                 apart_from: dict[str, np.ndarray],
                 error: type[ValueError] = ValueError) -> np.ndarray:
    """A caller's ``out=`` as the flat output of a call writing ``count`` elements of
    ``holder``, or ``error`` naming what is wrong.

    Every pass writes ``out`` chunk by chunk while it still reads its inputs' later chunks,
    so ``out`` may share no memory with any of ``apart_from`` (named for the message). Each
    caller chooses its error: a mistake of the caller's own (``ValueError``), or the codec's
    ``CodecError`` for an unusable input.
    """
    flags = out.flags
    if (out.dtype != holder or out.size != count
            or not (flags.c_contiguous and flags.writeable)):
        raise error(f"out must be a writeable C-contiguous {holder} array of {count} "
                    f"elements, got {out.dtype} with {out.size} (contiguous "
                    f"{flags.c_contiguous}, writeable {flags.writeable})")
    shared = [name for name, array in apart_from.items() if np.may_share_memory(out, array)]
    if shared:
        raise error(f"out must be a separate buffer, but it shares memory with the "
                    f"{' and '.join(shared)}")
    return out.reshape(-1)


def populate(array: np.ndarray) -> None:
    """Faults in the whole pages inside a fresh ``array`` with one ``madvise`` call
    (``MADV_POPULATE_WRITE``) before it is written, instead of one trap per 4 KiB page.

    For a fresh output's chunk, in encode's pass 1 from the codec thread that writes it in
    pass 2: the same zeroed pages for less CPU than faulting them in one by one (measured
    ~0.8 ns an element of a float32 encode, ``bench/README.md``, "Encode CPU per element"),
    spread over the codec threads (one call for the whole output ran on one thread and made
    a single decode slower in wall time). Not in decode: populating each chunk just before
    its addition writes it measured slower there. Advice only: an old kernel or another OS
    refuses it and the writes fault the pages in as before.
    """
    if array.nbytes >= 2 * _PAGE_BYTES:
        _advise(array, _MADV_POPULATE_WRITE)


def _advise(array: np.ndarray, advice: int) -> None:
    """``madvise(advice)`` on the whole pages inside ``array``'s memory; the result is
    ignored (advice only), and nothing is asked off Linux."""
    start = -(-array.ctypes.data // _PAGE_BYTES) * _PAGE_BYTES
    end = (array.ctypes.data + array.nbytes) // _PAGE_BYTES * _PAGE_BYTES
    if sys.platform == "linux" and end > start:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
        madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), advice)


class Scratch:
    """Reusable buffers of one thread during one codec call.

    Fresh chunk-sized temporaries cost a page fault per 4 KiB on every chunk (as much as the
    arithmetic itself); reusing them through ``out=`` avoids that.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, np.ndarray] = {}
        self._objects: dict[str, object] = {}

    def get(self, name: str, n: int, dtype: np.dtype | type) -> np.ndarray:
        """A buffer of ``n`` elements of ``dtype``; its content is undefined."""
        buf = self._buffers.get(name)
        if buf is None or buf.size < n or buf.dtype != np.dtype(dtype):
            buf = np.empty(n, dtype)
            self._buffers[name] = buf
        return buf[:n]

    def keep(self, name: str, factory: Callable[[], T]) -> T:
        """An object made once per thread and call (e.g. a zstd context: ~250 us to set up)."""
        if name not in self._objects:
            self._objects[name] = factory()
        return self._objects[name]  # type: ignore[return-value]


class ScratchPool:
    """One ``Scratch`` per worker thread, for the duration of one codec call."""

    def __init__(self) -> None:
        self._local = threading.local()

    def get(self) -> Scratch:
        """The calling thread's scratch."""
        scratch: Scratch | None = getattr(self._local, "scratch", None)
        if scratch is None:
            scratch = self._local.scratch = Scratch()
        return scratch
