"""Restores through shared memory (same host): the daemon writes the step into a segment the
client created; the result equals the streamed one bit for bit (copied out, or as views of
the segment with ``zero_copy``), the segment's name never outlives the restore (refused,
failed, damaged, or its client SIGKILLed), and a daemon that cannot serve it (over TCP, a
forged, oversized, symlinked or FIFO name) refuses with a clear error."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from ckptd.client import (
    CorruptCheckpointError,
    InvalidCheckpointError,
    SharedMemoryRefusedError,
)
from ckptd.client.grpc_transport import Connection
from ckptd.client.restore import receive, restore_state
from ckptd.client.shm import RestoreSegment
from ckptd.protos import segments, streams
from ckptd.protos.v1 import pb
from client_support import SHM_DIR, CheckpointerFactory, client_segments
from daemon_harness import InProcessDaemon, start_in_process, wait_until


def state(seed: int) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(300, 257, generator=generator),
        "b": torch.randn(7, generator=generator).to(torch.bfloat16),
        "steps": torch.arange(1001, dtype=torch.int64) + seed,
        "scalar": torch.tensor(seed, dtype=torch.float64),
        "empty": torch.empty(0, 3),
    }


def own_segments() -> set[str]:
    """This process's client segments (other jobs on the host create theirs meanwhile)."""
    return {name for name in client_segments() if segments.segment_owner(name) == os.getpid()}


def unlinked_segment_holding(tensor: torch.Tensor) -> str | None:
    """The name of the unlinked client segment whose mapping holds ``tensor``, if any."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith("(deleted)") and segments.SEGMENT_PREFIX in line:
            start, end = (int(bound, 16) for bound in line.split()[0].split("-"))
            if start <= tensor.data_ptr() < end:
                return Path(line.split()[5]).name
    return None


def assert_bit_identical(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        other = got[name]
        assert other.dtype == tensor.dtype and other.shape == tensor.shape, name
        assert torch.equal(other.reshape(-1).view(torch.uint8),
                           tensor.reshape(-1).view(torch.uint8)), name


@pytest.mark.parametrize("policy", ["exact", "lossy:3"])
def test_restore_through_shm_equals_the_stream_bit_for_bit(
    daemon: InProcessDaemon, make_checkpointer: CheckpointerFactory, policy: str
) -> None:
    run = f"shm-restore-{policy.replace(':', '')}"
    saver = make_checkpointer(daemon.address, run, transport="shm",
                              policies=[("w", policy), ("*", "exact")])
    for step in range(1, 4):
        saver.save(step, state(step))
    saver.wait(timeout_s=120)
    streamed = make_checkpointer(daemon.address, run, transport="grpc")
    staging = own_segments()  # the saver's pooled staging buffers live until it closes
    for step in (3, 1):  # the head, served from memory, and one rebuilt from storage
        via_shm = saver.restore_info(step)
        via_views = saver.restore_info(step, zero_copy=True)
        via_stream = streamed.restore_info(step)
        assert (via_shm.transport, via_views.transport, via_stream.transport) == (
            "shm", "shm", "grpc")
        assert via_shm.checksum == via_views.checksum == via_stream.checksum
        assert_bit_identical(via_shm.state, via_stream.state)
        assert_bit_identical(via_views.state, via_stream.state)
        if policy == "exact":
            assert_bit_identical(via_shm.state, state(step))
        else:  # step 1 is the exact base; step 3 a lossy delta
            assert torch.equal(via_shm.state["w"], state(step)["w"]) == (step == 1)
    assert own_segments() == staging


def many_tensors(seed: int) -> dict[str, torch.Tensor]:
    """Tensors of mixed sizes: the daemon reuses blob buffers from one to the next."""
    generator = torch.Generator().manual_seed(seed)
    sizes = [257, 3, 70_000, 11, 300_000, 1, 5_000, 300_001, 64, 70_001] * 3
    return {f"t{i}": torch.randn(n, generator=generator) for i, n in enumerate(sizes)}


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_a_base_restored_from_storage_after_a_restart_is_bit_identical(
    tmp_path: Path, make_checkpointer: CheckpointerFactory, compression: str
) -> None:
    from ckptd.daemon.config import EngineConfig

    config = {"listen": f"unix://{tmp_path}/ckptd.sock",
              "engine": EngineConfig(base_compression=compression)}
    first = start_in_process(tmp_path / "storage", **config)
    try:
        saver = make_checkpointer(first.address, "shm-base", transport="shm")
        for step in (1, 2):
            saver.save(step, many_tensors(step))
        saver.wait(timeout_s=120)
        # Step 2 is a lossy delta: its reconstruction, served from memory here.
        expected = {1: many_tensors(1), 2: saver.restore(2)}
        saver.close()
    finally:
        first.stop()
    # After a restart nothing is in memory: both steps are read and decoded while written.
    second = start_in_process(tmp_path / "storage", **config)
    try:
        ckpt = make_checkpointer(second.address, "shm-base", transport="shm")
        for step, zero_copy in [(1, False), (2, False), (1, True)]:
            restored = ckpt.restore_info(step, zero_copy=zero_copy)
            assert restored.transport == "shm"
            assert_bit_identical(restored.state, expected[step])
    finally:
        second.stop()


def test_a_refused_segment_falls_back_to_the_stream_and_is_unlinked(
    daemon: InProcessDaemon, make_checkpointer: CheckpointerFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ckpt = make_checkpointer(daemon.address, "shm-refused")  # auto: shm with a fallback
    ckpt.save(1, state(1))
    ckpt.wait(timeout_s=60)
    before = own_segments()
    created: list[str] = []
    real = RestoreSegment.reference.fget

    def elsewhere(segment: RestoreSegment) -> streams.Segment:
        created.append(segment.name)
        assert (SHM_DIR / segment.name).exists() and real is not None
        # What a client in another container sees: its segment is not in our /dev/shm.
        return streams.Segment("ckptdc_0_not_on_this_host", real(segment).fd)

    monkeypatch.setattr(RestoreSegment, "reference", property(elsewhere))
    restored = ckpt.restore_info(1)
    assert restored.transport == "grpc"
    assert_bit_identical(restored.state, state(1))
    assert created and not (SHM_DIR / created[0]).exists()
    assert own_segments() - before == set()


def test_a_daemon_over_tcp_refuses_shm_and_the_client_streams(tmp_path: Path) -> None:
    from daemon_harness import start_in_process

    tcp = start_in_process(tmp_path / "storage")
    connection = Connection(tcp.address, call_timeout_s=30.0)
    try:
        from ckptd.client import Checkpointer

        with Checkpointer(tcp.address, "tcp", connect_timeout_s=30.0) as ckpt:
            ckpt.save(1, state(1))
            ckpt.wait(timeout_s=60)
            restored = ckpt.restore_info(1)
        assert restored.transport == "grpc"
        assert_bit_identical(restored.state, state(1))
        request = pb.RestoreRequest(run="tcp", rank=0, step=1)
        with pytest.raises(SharedMemoryRefusedError, match="only to clients on the daemon's unix"):
            restore_state(connection, request, "cpu", shared_memory=True, fallback=False)
        fallen_back = restore_state(connection, request, "cpu", shared_memory=True, fallback=True)
        assert fallen_back.transport == "grpc"
        assert_bit_identical(fallen_back.state, state(1))
    finally:
        connection.close()
        tcp.stop()


@pytest.fixture
def saved(daemon: InProcessDaemon, make_checkpointer: CheckpointerFactory) -> Iterator[Connection]:
    ckpt = make_checkpointer(daemon.address, "forged", transport="shm")
    ckpt.save(1, state(1))
    ckpt.wait(timeout_s=60)
    connection = Connection(daemon.address, call_timeout_s=30.0)
    yield connection
    connection.close()


def restore_into(connection: Connection, name: str) -> Any:
    request = pb.RestoreRequest(run="forged", rank=0, step=1)
    request.shared_memory.segment_name = name
    return connection.restore(request, receive)


@pytest.mark.parametrize("name", ["../../etc/passwd", "a/b", ".hidden", "x" * 300, ""])
def test_a_forged_or_oversized_segment_name_is_invalid(saved: Connection, name: str) -> None:
    with pytest.raises(InvalidCheckpointError, match=r"shared memory segment name .* is invalid"):
        restore_into(saved, name)


@pytest.fixture
def planted() -> Iterator[Path]:
    """A unique path in /dev/shm named like a client segment, removed afterwards."""
    path = SHM_DIR / f"{segments.SEGMENT_PREFIX}{os.getpid()}_test_{secrets.token_hex(4)}"
    yield path
    path.unlink(missing_ok=True)


def test_a_symlinked_segment_is_refused_not_followed(
    saved: Connection, planted: Path, tmp_path: Path
) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    planted.symlink_to(victim)
    with pytest.raises(SharedMemoryRefusedError, match="is a symlink"):
        restore_into(saved, planted.name)
    assert victim.read_bytes() == b"keep"


def test_a_fifo_named_like_a_segment_is_refused(saved: Connection, planted: Path) -> None:
    os.mkfifo(planted, 0o600)
    with pytest.raises(SharedMemoryRefusedError, match="is a FIFO"):
        restore_into(saved, planted.name)


def test_a_missing_segment_is_refused(saved: Connection, planted: Path) -> None:
    with pytest.raises(SharedMemoryRefusedError, match="does not exist on the daemon's host"):
        restore_into(saved, planted.name)


STALLED_RESTORER = """
import os, sys, time
from ckptd.client import Checkpointer
from ckptd.protos import streams

def stall(self, index, source, on_progress):
    mapped = [line.split()[-1] for line in open("/proc/self/maps") if "/dev/shm/" in line]
    print(mapped[-1].rsplit("/", 1)[-1], flush=True)  # the segment being copied out
    time.sleep(600)

streams._Assembler.copy_from = stall
Checkpointer(sys.argv[1], "killed", transport="shm").restore(1)
"""


def test_a_client_killed_mid_restore_leaves_no_segment(
    daemon: InProcessDaemon, make_checkpointer: CheckpointerFactory, tmp_path: Path
) -> None:
    ckpt = make_checkpointer(daemon.address, "killed", transport="shm")
    ckpt.save(1, state(1))
    ckpt.wait(timeout_s=60)
    script = tmp_path / "restorer.py"
    script.write_text(STALLED_RESTORER)
    with subprocess.Popen([sys.executable, str(script), daemon.address],
                          stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            name = proc.stdout.readline().strip()  # the daemon sized it and wrote a batch
            assert name.startswith(segments.SEGMENT_PREFIX), name
            assert (SHM_DIR / name).stat().st_size >= 300 * 257 * 4
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    wait_until(lambda: not (SHM_DIR / name).exists(), 30, f"{name} to be unlinked")
    wait_until(lambda: daemon.call(lambda engine: engine.restore_bytes) == 0, 30,
               "the restore budget to be released")
    assert_bit_identical(ckpt.restore(1), state(1))


@pytest.mark.parametrize("zero_copy", [False, True])
def test_a_segment_damaged_after_the_daemon_wrote_it_is_refused(
    daemon: InProcessDaemon, make_checkpointer: CheckpointerFactory,
    monkeypatch: pytest.MonkeyPatch, zero_copy: bool,
) -> None:
    from ckptd.daemon.server import shm as daemon_shm

    ckpt = make_checkpointer(daemon.address, f"shm-damaged-{zero_copy}", transport="shm")
    ckpt.save(1, state(1))
    ckpt.wait(timeout_s=60)
    real_write = daemon_shm.write_tensors
    damaged: list[str] = []

    def write_then_flip(segment: Any, ref: Any, arrays: Any, span: range) -> None:
        real_write(segment, ref, arrays, span)
        os.pwrite(segment.fd, b"\x5a", ref.offsets[span.start] + 1)  # after the daemon's copy
        damaged.append(ref.name)

    monkeypatch.setattr(daemon_shm, "write_tensors", write_then_flip)
    with pytest.raises(CorruptCheckpointError, match="damaged in transit"):
        ckpt.restore(1, zero_copy=zero_copy)
    assert damaged and not (SHM_DIR / damaged[0]).exists()
    monkeypatch.undo()
    assert_bit_identical(ckpt.restore(1, zero_copy=zero_copy), state(1))


def test_zero_copy_tensors_are_writable_views_that_outlive_the_unlinked_segment(
    daemon: InProcessDaemon, make_checkpointer: CheckpointerFactory
) -> None:
    ckpt = make_checkpointer(daemon.address, "shm-views", transport="shm")
    ckpt.save(1, state(1))
    ckpt.wait(timeout_s=60)
    restored = ckpt.restore_info(1, zero_copy=True)
    assert restored.transport == "shm"
    w = restored.state["w"]
    # The tensors are views of a mapping of a segment unlinked before restore returned.
    name = unlinked_segment_holding(w)
    assert name is not None and not (SHM_DIR / name).exists()
    w.add_(1.0)  # a trainer's in-place update: writable, no fault
    assert torch.equal(w, state(1)["w"] + 1.0)
    assert_bit_identical(ckpt.restore(1), state(1))  # the daemon's head is untouched
    assert unlinked_segment_holding(ckpt.restore(1)["w"]) is None  # by default: a copy


def mapped_segment_bytes() -> dict[str, int]:
    """Bytes of client segments this process maps, by name, linked or not (a restore
    segment's first page is mapped by ``SharedMemory`` itself while it lives)."""
    mapped: dict[str, int] = {}
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) > 5 and segments.SEGMENT_PREFIX in fields[5]:
            start, end = (int(bound, 16) for bound in fields[0].split("-"))
            name = Path(fields[5]).name
            mapped[name] = mapped.get(name, 0) + end - start
    return mapped


@pytest.mark.parametrize("step", [1, 2])  # from storage, and the head in memory
def test_a_copying_restore_reads_through_a_mapping_it_drops_before_returning(
    daemon: InProcessDaemon, make_checkpointer: CheckpointerFactory,
    monkeypatch: pytest.MonkeyPatch, step: int,
) -> None:
    from ckptd.protos import streams

    ckpt = make_checkpointer(daemon.address, f"shm-mapped-{step}", transport="grpc")
    for saved in (1, 2):
        ckpt.save(saved, many_tensors(saved))
    ckpt.wait(timeout_s=60)
    expected = ckpt.restore(step)  # over the stream: no segment
    ckpt.close()
    reader = make_checkpointer(daemon.address, f"shm-mapped-{step}", transport="shm")
    before = mapped_segment_bytes()
    real_copy = streams._Assembler.copy_from
    seen: list[dict[str, int]] = []

    def copy_from(self: Any, index: int, source: Any, on_progress: Any) -> None:
        seen.append(mapped_segment_bytes())
        real_copy(self, index, source, on_progress)

    monkeypatch.setattr(streams._Assembler, "copy_from", copy_from)
    restored = reader.restore(step)
    assert_bit_identical(restored, expected)
    # Every tensor was copied while the whole segment was mapped (more than the page
    # SharedMemory maps), and the mapping went with the restore: the trainer's tensors
    # are its own memory, not views of a segment.
    total = sum(tensor.nbytes for tensor in expected.values())
    assert len(seen) == len(expected)
    assert all(len(mapped.keys() - before.keys()) == 1 for mapped in seen)
    assert all(sum(mapped.values()) - sum(before.values()) > total for mapped in seen)
    assert mapped_segment_bytes() == before
    assert all(unlinked_segment_holding(tensor) is None for tensor in restored.values())
