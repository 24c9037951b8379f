"""Issue 14, item 3: a hostile local client cannot hurt the daemon through shared memory.

Every trap here lives under a name no other process uses (``ckptdtest_<random>``, outside
the client prefix that sweeps scan) and is removed at teardown; the traps that must carry
the client prefix (what the sweeps see) run in a private ``/dev/shm`` (a mount namespace
of their own, ``unshare -m``) or in a directory under ``tmp_path``.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import daemon_wire as wire
import grpc
import numpy as np
import pytest
from ckptd.protos import segments
from ckptd.protos.status import reason_of
from ckptd.protos.v1 import pb
from daemon_harness import DaemonProcess, InProcessDaemon, SpawnDaemon

SHM = segments.SHM_ROOT
STATE = {"w": np.linspace(-1, 1, 4096, dtype=np.float32)}
REFUSED = "ERROR_REASON_SHARED_MEMORY_REFUSED"


@pytest.fixture
def trap_path() -> Iterator[Path]:
    """A path in /dev/shm that nobody else uses; removed whatever the test left there."""
    path = SHM / f"ckptdtest_{os.getpid()}_{secrets.token_hex(8)}"
    try:
        yield path
    finally:
        if path.is_symlink() or path.exists():
            path.unlink()


def _shm_request(name: str, size: int, step: int = 1, run: str = "hostile") -> pb.SaveRequest:
    ref = pb.SharedMemoryRef(segment_name=name, segment_bytes=size, offsets=[0])
    return pb.SaveRequest(header=wire.header_of(run, step, STATE, shared_memory=ref))


def _refused(address: str, name: str, size: int = STATE["w"].nbytes) -> grpc.RpcError:
    with grpc.insecure_channel(address) as channel:
        client = wire.stub(channel)
        error = wire.rpc_error(lambda: client.Save(iter([_shm_request(name, size)]), timeout=30))
    assert error.code() is grpc.StatusCode.FAILED_PRECONDITION, error
    assert reason_of(error).reason == REFUSED
    return error


def _still_serves(address: str, run: str = "hostile", step: int = 1) -> None:
    """The step the attack named was never reserved: the same step saves and restores."""
    with grpc.insecure_channel(address) as channel:
        client = wire.stub(channel)
        wire.save_durable(client, run, step, STATE)
        _, arrays = wire.restore(client, run, step)
    assert np.array_equal(arrays["w"], STATE["w"])


def _write_segment(path: Path, data: bytes, uid: int | None = None) -> None:
    path.write_bytes(data)
    path.chmod(0o644)  # world-readable: only the owner check keeps the daemon out
    if uid is not None:
        os.chown(path, uid, -1)


def test_a_fifo_segment_is_refused_at_once_and_the_drain_finishes(
    unix_daemon: InProcessDaemon, trap_path: Path
) -> None:
    os.mkfifo(trap_path)
    error = _refused(unix_daemon.address, trap_path.name)
    assert "is a FIFO" in error.details()
    assert unix_daemon.call(lambda engine: engine.inflight_bytes) == 0
    _still_serves(unix_daemon.address)
    started = time.monotonic()
    unix_daemon.stop()
    assert time.monotonic() - started < 30


def test_a_symlink_segment_is_refused_not_followed(
    unix_daemon: InProcessDaemon, trap_path: Path, tmp_path: Path
) -> None:
    secret = tmp_path / "secret"
    _write_segment(secret, STATE["w"].tobytes())
    trap_path.symlink_to(secret)
    error = _refused(unix_daemon.address, trap_path.name)
    assert "symlink" in error.details()
    _still_serves(unix_daemon.address)


def test_another_users_world_readable_file_is_refused(
    unix_daemon: InProcessDaemon, trap_path: Path
) -> None:
    if os.geteuid() != 0:
        pytest.skip("creating a file owned by another uid needs root")
    _write_segment(trap_path, STATE["w"].tobytes(), uid=65534)
    error = _refused(unix_daemon.address, trap_path.name)
    assert "owned by uid 65534" in error.details()
    _still_serves(unix_daemon.address)


def test_shared_memory_is_refused_over_tcp(daemon: InProcessDaemon, trap_path: Path) -> None:
    _write_segment(trap_path, STATE["w"].tobytes())
    error = _refused(daemon.address, trap_path.name)
    assert "unix socket" in error.details()
    _still_serves(daemon.address)


def test_a_segment_shorter_than_claimed_is_invalid_naming_sizes(
    unix_daemon: InProcessDaemon, trap_path: Path
) -> None:
    _write_segment(trap_path, b"\0" * 100)
    with grpc.insecure_channel(unix_daemon.address) as channel:
        client = wire.stub(channel)
        request = _shm_request(trap_path.name, STATE["w"].nbytes)
        error = wire.rpc_error(lambda: client.Save(iter([request]), timeout=30))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert f"holds 100 bytes, less than the {STATE['w'].nbytes}" in error.details()


@pytest.mark.slow  # ~4 s (a large segment shrunk mid-copy): the full suite (--all) runs it
def test_shrinking_a_segment_during_the_copy_fails_that_save_only(
    tmp_path: Path, spawn_daemon: SpawnDaemon, trap_path: Path
) -> None:
    """Before, the daemon copied from a mapping: a client's ftruncate mid-copy SIGBUSed it.
    The segment is shrunk the moment the daemon holds it open (seen in /proc/PID/fd)."""
    proc = spawn_daemon(tmp_path / "storage", "--listen", f"unix://{tmp_path}/d.sock")
    nbytes = 256 << 20
    array = np.ones(nbytes // 4, dtype=np.float32)
    outcomes = []
    for attempt in range(5):
        _write_segment(trap_path, b"")
        os.truncate(trap_path, nbytes)
        shrinker = threading.Thread(target=_shrink_when_open, args=(proc, trap_path))
        shrinker.start()
        ref = pb.SharedMemoryRef(segment_name=trap_path.name, segment_bytes=nbytes, offsets=[0])
        header = wire.header_of("shrink", attempt + 1, {"w": array}, shared_memory=ref)
        error = _save_error(proc.address, pb.SaveRequest(header=header))
        shrinker.join(30)
        trap_path.unlink()
        assert proc.proc.poll() is None, proc.log()  # still alive: no SIGBUS
        outcomes.append(error)
        if "shrank during the copy" in (error.details() or ""):
            break
    assert outcomes[-1].code() is grpc.StatusCode.INVALID_ARGUMENT, outcomes
    assert "shrank during the copy" in outcomes[-1].details()
    _still_serves(proc.address, run="shrink", step=len(outcomes))


def _save_error(address: str, request: pb.SaveRequest) -> grpc.RpcError:
    with grpc.insecure_channel(address) as channel:
        client = wire.stub(channel)
        return wire.rpc_error(lambda: client.Save(iter([request]), timeout=60))


def _shrink_when_open(proc: DaemonProcess, path: Path, timeout_s: float = 30.0) -> None:
    fds = Path(f"/proc/{proc.pid}/fd")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for fd in os.listdir(fds):
            try:
                if os.readlink(fds / fd) == str(path):
                    os.truncate(path, 4096)
                    return
            except FileNotFoundError:
                continue


def test_sweeps_never_open_fifos_or_follow_links(tmp_path: Path) -> None:
    """The rule both the daemon's sweep and the client's scan run, on a private root."""
    target = tmp_path / "target"
    target.write_bytes(b"x")
    root = tmp_path / "shm"
    root.mkdir()
    os.mkfifo(root / f"{segments.SEGMENT_PREFIX}1_fifo")
    (root / f"{segments.SEGMENT_PREFIX}2_link").symlink_to(target)
    os.utime(target, (0, 0))  # old: a followed link would look like an orphan
    skipped: list[tuple[str, str]] = []
    done = threading.Event()

    def sweep() -> None:
        segments.reclaim_orphans(root, on_skip=lambda *entry: skipped.append(entry))
        done.set()

    threading.Thread(target=sweep, daemon=True).start()
    assert done.wait(30), "the sweep blocked"
    assert sorted(skipped) == [(f"{segments.SEGMENT_PREFIX}1_fifo", "FIFO"),
                               (f"{segments.SEGMENT_PREFIX}2_link", "symlink")]
    assert target.exists() and (root / f"{segments.SEGMENT_PREFIX}2_link").is_symlink()


_IN_NAMESPACE = """
import sys, time
sys.path.insert(0, sys.argv[2])
from pathlib import Path
import torch
from ckptd.client import Checkpointer
from daemon_harness import spawn
work = Path(sys.argv[1])
proc = spawn(work / "storage", work / "run", ["--listen", f"unix://{work}/d.sock"],
             ready_timeout_s=60)
try:
    with Checkpointer(proc.address, "ns", transport="shm", connect_timeout_s=30) as ckpt:
        ckpt.save(1, {"w": torch.arange(8.0)}).wait_durable(60)
        assert ckpt.transport == "shm"
        assert torch.equal(ckpt.restore()["w"], torch.arange(8.0))
    print("ok")
finally:
    proc.terminate(60)
"""


@pytest.mark.slow  # over 2 s: the full suite (--all) runs it
def test_a_fifo_named_like_a_client_segment_blocks_neither_serve_nor_the_client(
    tmp_path: Path,
) -> None:
    """Before, the start-up sweep and the client's scan opened the FIFO and blocked forever.
    Runs in a private /dev/shm, so the FIFO under the client prefix bothers nobody else."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) for a private /dev/shm")
    fifo = SHM / f"{segments.SEGMENT_PREFIX}1_fifo"
    link = SHM / f"{segments.SEGMENT_PREFIX}2_link"
    setup = (f"mount -t tmpfs tmpfs {SHM} && mkfifo {fifo} && ln -s /etc/hostname {link} && "
             'exec "$0" "$@"')
    tests_dir = str(Path(__file__).resolve().parents[1])
    done = subprocess.run(
        ["unshare", "-m", "sh", "-c", setup, sys.executable, "-c", _IN_NAMESPACE,
         str(tmp_path), tests_dir],
        capture_output=True, text=True, timeout=180, check=False,
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-4000:]
    assert not fifo.exists() or not fifo.is_fifo()  # the FIFO never reached the real /dev/shm
