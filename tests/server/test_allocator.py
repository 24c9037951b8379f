"""The daemon's malloc thresholds (``daemon/server/allocator.py``) take on glibc, the C
library of every image and host it ships for; elsewhere ``tune`` leaves malloc alone."""

from __future__ import annotations

import dataclasses
import os

from ckptd.daemon.config import DaemonConfig
from ckptd.daemon.server import allocator


def _glibc() -> bool:
    try:
        return bool(os.confstr("CS_GNU_LIBC_VERSION"))
    except (ValueError, OSError):
        return False


def test_thresholds_are_set_exactly_where_the_c_library_is_glibc() -> None:
    assert allocator.tune() is _glibc()


def test_every_default_message_fits_under_the_mmap_threshold() -> None:
    # A message at the default limit must come from the heap (reused), not a fresh mapping;
    # glibc refuses an mmap threshold above 32 MiB on 64-bit.
    default = {f.name: f.default for f in dataclasses.fields(DaemonConfig)}
    assert default["max_message_bytes"] < allocator.MMAP_THRESHOLD_BYTES <= 32 << 20
    assert allocator.TRIM_THRESHOLD_BYTES >= allocator.MMAP_THRESHOLD_BYTES
