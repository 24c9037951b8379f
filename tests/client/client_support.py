"""Helpers the client tests import by name (a module, not ``conftest``: several test folders
have a ``conftest.py``, and ``from conftest import`` would pick whichever came first)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from ckptd.client import Checkpointer
from ckptd.protos.segments import SEGMENT_PREFIX
from daemon_harness import wait_until

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


def kill_when_signalled(script: Path, args: Sequence[str], signal: Path, log: Path) -> None:
    """Runs ``python script *args`` (a trainer), waits until it writes ``signal`` (every
    checkpoint it made is durable and it stands still mid-training), then SIGKILLs it."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, str(script), *args], stdout=out,
                                stderr=subprocess.STDOUT, env=env)
    try:
        def signalled() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"the trainer exited with {proc.returncode} before "
                                     f"it was killed:\n{log.read_text()[-4000:]}")
            return signal.exists()

        wait_until(signalled, 180, f"{script.name} to checkpoint and stop")
    finally:
        proc.kill()
        proc.wait(30)
    assert proc.returncode == -9, proc.returncode  # SIGKILL, not an exit of its own
