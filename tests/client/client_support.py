"""Helpers the client tests import by name (a module, not ``conftest``: several test folders
have a ``conftest.py``, and ``from conftest import`` would pick whichever came first)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ckptd.client import Checkpointer
from ckptd.protos.segments import SEGMENT_PREFIX

SHM_DIR = Path("/dev/shm")
CheckpointerFactory = Callable[..., Checkpointer]
"""``make_checkpointer(target, run, **kwargs)``, the fixture of ``tests/client/conftest.py``."""


def client_segments() -> set[str]:
    return {p.name for p in SHM_DIR.iterdir() if p.name.startswith(SEGMENT_PREFIX)}
