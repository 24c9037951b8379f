"""Shared by the CLI tests: the runs the ``store`` fixture saves and the types of fixtures.

A plain module with a unique name (``conftest`` is ambiguous across test directories).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from daemon_harness import InProcessDaemon

RUNS = {("alpha", 0): [1, 2, 3], ("alpha", 1): [1, 2, 3], ("beta", 0): [10, 20]}
CliRunner = Callable[..., tuple[int, str, str]]


def make_state(step: int, rank: int = 0) -> dict[str, Any]:
    """Float weights big enough to be stored lossily, plus exact-stored odds and ends."""
    generator = torch.Generator().manual_seed(1000 * rank + step)
    return {
        "model": {
            "w": torch.randn(64, 32, generator=generator),
            "b": torch.randn(32, generator=generator).to(torch.bfloat16),
            "steps_seen": torch.tensor([step], dtype=torch.int64),
        },
        "epoch": step // 2,
        "name": "cli-test",
    }


@dataclass
class Store:
    daemon: InProcessDaemon
    storage_path: Path
    # What Checkpointer.restore() returned for each (run, rank, step), while the daemon ran.
    restored: dict[tuple[str, int, int], Any]


def assert_same_state(got: Any, expected: Any, path: str = "state") -> None:
    """Same containers, keys, scalars, and tensors equal bit for bit in the same dtype."""
    assert type(got) is type(expected), path
    if isinstance(expected, torch.Tensor):
        assert (got.dtype, got.shape) == (expected.dtype, expected.shape), path
        assert torch.equal(got.reshape(-1).view(torch.uint8),
                           expected.reshape(-1).view(torch.uint8)), path
    elif isinstance(expected, dict):
        assert list(got) == list(expected), path
        for key in expected:
            assert_same_state(got[key], expected[key], f"{path}[{key!r}]")
    elif isinstance(expected, list | tuple):
        assert len(got) == len(expected), path
        for i, (a, b) in enumerate(zip(got, expected, strict=True)):
            assert_same_state(a, b, f"{path}[{i}]")
    else:
        assert got == expected, path
