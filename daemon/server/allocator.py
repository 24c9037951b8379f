"""The daemon process's malloc settings: keep freed chunk-sized memory for the next chunk.

Every message of a gRPC stream is a few allocations of its size: gRPC's slices, the
``bytes`` object it hands to Python, a restore chunk's serialized form. With glibc's
defaults those come and go through ``mmap``/``munmap`` (or ``brk`` and a trim of the heap
top once twice the last freed size lies free there), so every chunk's pages are faulted in
and zeroed afresh by the kernel: a save streamed over a unix socket spent more of the
daemon's CPU in page faults than in copying (``perf``, 256 MiB of weights: 63 % of its
samples under ``exc_page_fault``). Raising the mmap threshold above any message and the
trim threshold above the few messages in flight lets freed chunks be reused from the heap
instead; measured in bench/README.md ("gRPC transport"). Large receive buffers and
tensors (above ``MMAP_THRESHOLD_BYTES``) are still mapped and unmapped as before, so what
the process keeps beyond its live memory is at most ``TRIM_THRESHOLD_BYTES`` of free heap
per malloc arena (README, "Memory bound").

Applied once when the daemon starts (``Daemon.start``); a process-wide setting, which is
why the trainer-side client never does this to the trainer.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

MiB = 1 << 20
# glibc's own ceiling for the threshold it adjusts dynamically (DEFAULT_MMAP_THRESHOLD_MAX
# on 64-bit): above any chunk or message the daemon accepts (max_message_bytes, 8 MiB).
MMAP_THRESHOLD_BYTES = 32 * MiB
# Free heap kept at the top before it is returned: a few chunks' worth in flight (32, 64
# and 128 MiB cost the same daemon CPU per save; the least keeps the least memory).
TRIM_THRESHOLD_BYTES = 32 * MiB
_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
_M_MMAP_THRESHOLD = -3


def tune() -> bool:
    """Sets the thresholds above in this process; False (and nothing done) where the C
    library is not glibc or refuses them."""
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return False
    except (ValueError, OSError):  # not a glibc system
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    mallopt = ctypes.CDLL(name).mallopt
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # mallopt returns 1 on success, 0 on error.
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )
