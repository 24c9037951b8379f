"""Helpers the client tests import by name (a module, not ``conftest``: several test folders
have a ``conftest.py``, and ``from conftest import`` would pick whichever came first)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from ckptd.client import Checkpointer
from ckptd.protos.segments import SEGMENT_PREFIX

SHM_DIR = Path("/dev/shm")
CheckpointerFactory = Callable[..., Checkpointer]
"""``make_checkpointer(target, run, **kwargs)``, the fixture of ``tests/client/conftest.py``."""


def client_segments() -> set[str]:
    return {p.name for p in SHM_DIR.iterdir() if p.name.startswith(SEGMENT_PREFIX)}


def assert_same_weights(
    got: torch.nn.Module, expected: torch.nn.Module, *, lossless: bool, atol: float = 5e-2
) -> None:
    """A resumed model against an uninterrupted one: bit-identical when every tensor was
    stored exactly, else within ``atol`` (the lossy codec's bound on these small models)."""
    reference = expected.state_dict()
    for name, tensor in got.state_dict().items():
        if lossless:
            assert torch.equal(tensor, reference[name]), name
        else:
            assert torch.allclose(tensor, reference[name], atol=atol), name
