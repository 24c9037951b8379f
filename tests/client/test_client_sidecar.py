"""The restore's second thread: what it populates ahead of the copy and releases behind
it (``Plan``, driven by hand here), the kernel calls it makes, its thread's lifetime, and
real restores through shared memory with the segment released under the copy."""

from __future__ import annotations

import mmap
import os
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from ckptd.client import CorruptCheckpointError
from ckptd.client.pages import PAGE_BYTES, HolePuncher, page_span
from ckptd.client.sidecar import MIN_RELEASE_BYTES, SLICE_BYTES, Plan, RestoreSidecar
from ckptd.protos import streams
from client_support import CheckpointerFactory
from daemon_harness import InProcessDaemon

MiB = 1 << 20


class Recorder:
    """Stands in for the populator or the puncher: records the ranges it is given."""

    enabled = True

    def __init__(self) -> None:
        self.calls: list[tuple[int, ...]] = []

    def populate_pages(self, start: int, end: int) -> bool:
        self.calls.append((start, end))
        return True

    def punch(self, fd: int, offset: int, nbytes: int) -> bool:
        self.calls.append((offset, offset + nbytes))
        return True


def fresh(nbytes: int, offset: int = 0) -> torch.Tensor:
    """A tensor over fresh anonymous memory, starting ``offset`` bytes into a page (as
    malloc's chunks do)."""
    memory = mmap.mmap(-1, nbytes + PAGE_BYTES)
    return torch.frombuffer(memory, dtype=torch.uint8, count=nbytes, offset=offset)


def drain(plan: Plan) -> None:
    while (job := plan.next_job()) is not None:
        job()


def recording_plan() -> tuple[Plan, Recorder, Recorder]:
    plan, populated, punched = Plan(), Recorder(), Recorder()
    plan.populator, plan.puncher = populated, punched  # type: ignore[assignment]
    return plan, populated, punched


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
    plan, populated, _ = recording_plan()
    first, small, second = fresh(40 * MiB, offset=16), fresh(MiB // 2), fresh(20 * MiB, 48)
    assert [plan.add(t) for t in (first, small, second)] == [True, False, True]
    drain(plan)
    assert all(end - start <= SLICE_BYTES for start, end in populated.calls)
    # Whole pages only, including the one that straddles a slice's end.
    assert merged(populated.calls) == [page_span(first.data_ptr(), first.nbytes),
                                       page_span(second.data_ptr(), second.nbytes)]


def test_the_copy_that_overtook_is_left_its_next_slice() -> None:
    plan, populated, _ = recording_plan()
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


def test_the_segment_is_released_behind_the_copy_in_whole_pages_only() -> None:
    plan, _, punched = recording_plan()
    sizes = [6 * MiB + 100, 10, 9 * MiB]
    offsets = [0, 6 * MiB + 128, 6 * MiB + 192]  # 64-byte aligned, as the daemon lays them
    assert plan.segment(fd=-1, offsets=offsets, sizes=sizes)
    plan.copied = sizes[0]
    assert plan.next_job() is None  # the daemon may still be writing the segment
    plan.written = True
    plan.copied = MIN_RELEASE_BYTES - 1
    assert plan.next_job() is None  # too little finished to be worth a call
    plan.copied = sizes[0] + 2  # into the second tensor: the first's last page is shared
    drain(plan)
    assert merged(punched.calls) == [(0, 6 * MiB)]
    plan.copied = sum(sizes) - 1  # one byte of the last tensor left to copy
    drain(plan)
    last_byte = offsets[2] + sizes[2] - 1
    assert merged(punched.calls) == [(0, last_byte // PAGE_BYTES * PAGE_BYTES)]
    assert all(end - start <= SLICE_BYTES for start, end in punched.calls)


@pytest.mark.parametrize("offsets", [[0, 4 * MiB], [8 * MiB, 0], [-64, 8 * MiB], [0]])
def test_a_layout_out_of_order_or_overlapping_releases_nothing(offsets: list[int]) -> None:
    plan, _, punched = recording_plan()
    assert not plan.segment(fd=-1, offsets=offsets, sizes=[8 * MiB, 8 * MiB])
    plan.copied, plan.written = 16 * MiB, True
    drain(plan)
    assert punched.calls == []


@pytest.fixture
def shm_file() -> Iterator[Path]:
    path = Path("/dev/shm") / f"ckptd-test-sidecar-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def test_a_punched_range_frees_its_pages_and_keeps_the_rest(shm_file: Path) -> None:
    fd = os.open(shm_file, os.O_CREAT | os.O_RDWR | os.O_EXCL, 0o600)
    try:
        os.write(fd, bytes(range(256)) * (32 * MiB // 256))
        allocated = os.fstat(fd).st_blocks * 512
        assert HolePuncher().punch(fd, 4 * MiB, 16 * MiB)
        assert os.fstat(fd).st_size == 32 * MiB
        assert allocated - os.fstat(fd).st_blocks * 512 == 16 * MiB
        assert os.pread(fd, 8, 4 * MiB) == bytes(8)
        assert os.pread(fd, 4, 20 * MiB) == bytes(range(4))
    finally:
        os.close(fd)


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
    """Tensors large enough to be populated (>= 1 MiB) and released (>= 4 MiB finished)."""
    generator = torch.Generator().manual_seed(17)
    sizes = [(3 * MiB // 2) + 3, 5, 2 * MiB, 7, (3 * MiB // 2) + 1]
    return {f"t{i}": torch.randn(n, generator=generator) for i, n in enumerate(sizes)}


def equal_bytes(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> bool:
    return got.keys() == want.keys() and all(
        got[k].dtype == v.dtype and got[k].shape == v.shape and torch.equal(got[k], v)
        for k, v in want.items())


class Punches:
    """Spies on the real puncher: what it freed, and an event once it freed past ``until``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.ranges: list[tuple[int, int]] = []
        self.until = 0
        self.reached = threading.Event()
        real = HolePuncher.punch

        def punch(puncher: HolePuncher, fd: int, offset: int, nbytes: int) -> bool:
            done = real(puncher, fd, offset, nbytes)
            self.ranges.append((offset, offset + nbytes))
            if done and offset + nbytes >= self.until:
                self.reached.set()
            return done

        monkeypatch.setattr(HolePuncher, "punch", punch)


def test_a_restore_copies_the_last_tensor_after_the_rest_of_the_segment_was_released(
    daemon: InProcessDaemon, make_checkpointer: CheckpointerFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    state = large_state()
    ckpt = make_checkpointer(daemon.address, "sidecar", transport="shm")
    ckpt.save(1, state)
    ckpt.wait(timeout_s=60)
    punches = Punches(monkeypatch)
    real_copy = streams._Assembler.copy_from
    last = len(state) - 1
    waited: list[bool] = []

    def copy_from(assembler: Any, index: int, source: Any, on_progress: Any) -> None:
        if index == last:  # hold the copy until the helper freed what came before
            finished = sum(t.nbytes for t in list(state.values())[:last])
            punches.until = finished // PAGE_BYTES * PAGE_BYTES - PAGE_BYTES
            waited.append(punches.reached.wait(timeout=60))
        real_copy(assembler, index, source, on_progress)

    monkeypatch.setattr(streams._Assembler, "copy_from", copy_from)
    restored = ckpt.restore_info(1)
    assert restored.transport == "shm" and waited == [True]
    assert equal_bytes(restored.state, state)
    assert sidecar_threads() == []
    assert len(punches.ranges) > 0 and punches.ranges == sorted(punches.ranges)
    count = len(punches.ranges)
    views = ckpt.restore_info(1, zero_copy=True)  # views of the segment: never released
    assert equal_bytes(views.state, state) and len(punches.ranges) == count


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
