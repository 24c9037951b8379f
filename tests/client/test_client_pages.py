"""The restore's page populator: fresh tensors faulted in by one call, before the copy."""

from __future__ import annotations

import mmap
from pathlib import Path

import torch
from ckptd.client.pages import MIN_POPULATED_BYTES, PagePopulator


def resident_bytes() -> int:
    """This process's resident set, from /proc/self/statm (pages)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096


def test_a_fresh_tensor_is_resident_after_populate_and_keeps_its_bytes() -> None:
    nbytes = 64 << 20
    # A private anonymous mapping: pages nobody touched yet, whatever the allocator kept
    # from earlier tests (a torch.empty may reuse resident heap memory in a long session).
    memory = mmap.mmap(-1, nbytes)
    tensor = torch.frombuffer(memory, dtype=torch.uint8)
    before = resident_bytes()
    assert PagePopulator().populate(tensor)
    assert resident_bytes() - before >= nbytes - (1 << 20)
    tensor.fill_(7)  # still the tensor's own, writable memory
    assert int(tensor.sum()) == 7 * nbytes


def test_small_tensors_are_left_to_fault_in() -> None:
    assert not PagePopulator().populate(torch.empty(MIN_POPULATED_BYTES - 1, dtype=torch.uint8))
