"""The restore's second thread: what it populates ahead of the copy (``Plan``, driven by
hand here), its thread's lifetime, and real restores through shared memory with it."""

from __future__ import annotations

import mmap
import os
import threading
from typing import Any

import pytest
import torch
from ckptd.client import CorruptCheckpointError
from ckptd.client.pages import MIN_POPULATED_BYTES, PAGE_BYTES, PagePopulator, page_span
from ckptd.client.sidecar import SLICE_BYTES, Plan, RestoreSidecar
from client_support import CheckpointerFactory
from daemon_harness import InProcessDaemon

MiB = 1 << 20


class Recorder:
    """Stands in for the populator: records the ranges it is given."""

    enabled = True

    def __init__(self) -> None:
        self.calls: list[tuple[int, ...]] = []

    def populate_pages(self, start: int, end: int) -> bool:
        self.calls.append((start, end))
        return True


def fresh(nbytes: int, offset: int = 0) -> torch.Tensor:
    """A tensor over fresh anonymous memory, starting ``offset`` bytes into a page (as
    malloc's chunks do)."""
    memory = mmap.mmap(-1, nbytes + PAGE_BYTES)
    return torch.frombuffer(memory, dtype=torch.uint8, count=nbytes, offset=offset)


def drain(plan: Plan) -> None:
    while (job := plan.next_job()) is not None:
        job()


def recording_plan() -> tuple[Plan, Recorder]:
    plan, populated = Plan(), Recorder()
    plan.populator = populated  # type: ignore[assignment]
    return plan, populated


def merged(calls: list[tuple[int, ...]]) -> list[tuple[int, int]]:
    """Contiguous calls joined, in call order."""
    spans: list[tuple[int, int]] = []
    for start, end in calls:
        if spans and spans[-1][1] == start:
            spans[-1] = (spans[-1][0], end)
        else:
            spans.append((start, end))
    return spans


def test_fresh_tensors_are_populated_ahead_in_table_order_a_slice_at_a_time() -> None:
    plan, populated = recording_plan()
    first, small, second = fresh(40 * MiB, offset=16), fresh(MiB // 2), fresh(20 * MiB, 48)
    assert [plan.add(t) for t in (first, small, second)] == [True, False, True]
    drain(plan)
    assert all(end - start <= SLICE_BYTES for start, end in populated.calls)
    # Whole pages only, including the one that straddles a slice's end.
    assert merged(populated.calls) == [page_span(first.data_ptr(), first.nbytes),
                                       page_span(second.data_ptr(), second.nbytes)]


def test_the_copy_that_overtook_is_left_its_next_slice() -> None:
    plan, populated = recording_plan()
    first, second = fresh(8 * MiB, 16), fresh(40 * MiB, 16)
    plan.add(first)
    plan.add(second)
    plan.copied = first.nbytes + 3 * MiB + 5  # the copy overtook the helper
    drain(plan)
    reached = -(-(second.data_ptr() + 3 * MiB + 5) // PAGE_BYTES) * PAGE_BYTES
    end = page_span(second.data_ptr(), second.nbytes)[1]
    assert merged(populated.calls) == [(reached + SLICE_BYTES, end)]
    plan.add(fresh(8 * MiB))
    plan.copied = first.nbytes + second.nbytes + 4 * MiB  # past the helper, near the end
    drain(plan)
    assert len(populated.calls) == 2  # nothing of the third: the copy's next slice


def sidecar_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "ckptd-restore-sidecar"]


def test_the_thread_starts_for_work_and_is_joined_on_close() -> None:
    with RestoreSidecar() as sidecar:
        sidecar.add(torch.empty(16))
        assert sidecar_threads() == []  # nothing worth a thread
        tensor = fresh(8 * MiB)
        sidecar.add(tensor)
        assert len(sidecar_threads()) == 1
    assert sidecar_threads() == []
    tensor.fill_(3)
    assert int(tensor.sum()) == 3 * 8 * MiB


def test_the_thread_is_joined_when_the_restore_raises() -> None:
    with pytest.raises(KeyError), RestoreSidecar() as sidecar:
        sidecar.add(fresh(64 * MiB))
        sidecar.copied(MiB)
        raise KeyError("a failed copy")
    assert sidecar_threads() == []


def large_state() -> dict[str, torch.Tensor]:
    """Tensors large enough to be populated (>= 1 MiB), and small ones between them."""
    generator = torch.Generator().manual_seed(17)
    sizes = [(3 * MiB // 2) + 3, 5, 2 * MiB, 7, (3 * MiB // 2) + 1]
    return {f"t{i}": torch.randn(n, generator=generator) for i, n in enumerate(sizes)}


def equal_bytes(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> bool:
    return got.keys() == want.keys() and all(
        got[k].dtype == v.dtype and got[k].shape == v.shape and torch.equal(got[k], v)
        for k, v in want.items())


def test_a_restore_through_shared_memory_with_the_helper_is_bit_identical(
    daemon: InProcessDaemon, make_checkpointer: CheckpointerFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    state = large_state()
    ckpt = make_checkpointer(daemon.address, "sidecar", transport="shm")
    ckpt.save(1, state)
    ckpt.wait(timeout_s=60)
    populated: list[tuple[int, int]] = []
    real = PagePopulator.populate_pages

    def populate_pages(populator: PagePopulator, start: int, end: int) -> bool:
        populated.append((start, end))
        return real(populator, start, end)

    monkeypatch.setattr(PagePopulator, "populate_pages", populate_pages)
    restored = ckpt.restore_info(1)
    assert restored.transport == "shm" and equal_bytes(restored.state, state)
    assert sidecar_threads() == []
    spans = [page_span(t.data_ptr(), t.nbytes) for t in restored.state.values()
             if t.nbytes >= MIN_POPULATED_BYTES]
    # Every range advised lay inside a tensor the trainer got back (its own memory).
    assert populated and all(any(lo <= start and end <= hi for lo, hi in spans)
                             for start, end in populated)


def test_a_restore_that_fails_leaves_no_thread(
    daemon: InProcessDaemon, make_checkpointer: CheckpointerFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ckptd.daemon.server import shm as daemon_shm

    ckpt = make_checkpointer(daemon.address, "sidecar-damaged", transport="shm")
    ckpt.save(1, large_state())
    ckpt.wait(timeout_s=60)
    real_write = daemon_shm.write_tensors

    def write_then_flip(segment: Any, ref: Any, arrays: Any, span: range) -> None:
        real_write(segment, ref, arrays, span)
        os.pwrite(segment.fd, b"\x5a", ref.offsets[span.stop - 1] + 1)

    monkeypatch.setattr(daemon_shm, "write_tensors", write_then_flip)
    with pytest.raises(CorruptCheckpointError, match="damaged in transit"):
        ckpt.restore(1)
    assert sidecar_threads() == []
