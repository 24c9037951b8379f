"""The client when the daemon is busy, down, or restarted under it."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from ckptd.client import (
    Checkpointer,
    DaemonUnavailableError,
    RequestCancelledError,
    SaveFailedError,
    SaveState,
)
from ckptd.daemon.config import EngineConfig
from ckptd.protos.v1 import pb, pb_grpc
from client_support import CheckpointerFactory
from daemon_harness import DaemonProcess, start_in_process, wait_until

MiB = 1 << 20
SpawnDaemon = Callable[..., DaemonProcess]


def finishes(fn: Callable[[], Any], timeout_s: float = 120.0) -> Any:
    """Runs ``fn`` on a thread and fails the test if it hangs (instead of hanging CI)."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout_s)
    assert not thread.is_alive(), f"{fn} still blocked after {timeout_s} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def answers(ckpt: Checkpointer) -> bool:
    """Whether a call of ``ckpt`` reaches a daemon within its reconnect window."""
    try:
        ckpt.steps()
    except DaemonUnavailableError:
        return False
    return True


class BudgetHog:
    """A raw Save stream that announces ``nbytes`` and sends none, so the daemon holds
    that much of its in-flight budget until ``release``."""

    def __init__(self, address: str, nbytes: int) -> None:
        self._gate = threading.Event()
        self._channel = grpc.insecure_channel(address)
        stub = pb_grpc.CheckpointdServiceStub(self._channel)
        spec = pb.TensorSpec(name="x", dtype=pb.DTYPE_UINT8, shape=[nbytes], nbytes=nbytes)
        header = pb.SaveHeader(run="hog", rank=0, step=1, tensors=[spec])

        def requests() -> Iterator[pb.SaveRequest]:
            yield pb.SaveRequest(header=header)
            self._gate.wait(120)

        self._future = stub.Save.future(requests())

    def release(self) -> None:
        self._gate.set()
        # The daemon refuses the incomplete stream, which frees the budget.
        with contextlib.suppress(grpc.RpcError):
            self._future.result(timeout=60)
        self._channel.close()


def test_busy_daemon_skips_or_waits_by_policy(
    tmp_path: Path, make_checkpointer: CheckpointerFactory
) -> None:
    daemon = start_in_process(tmp_path / "storage", engine=EngineConfig(max_inflight_bytes=MiB))
    hog = BudgetHog(daemon.address, MiB - 4096)
    try:
        wait_until(
            lambda: daemon.call(lambda e: e.inflight_bytes) > 0, what="the hog's reservation"
        )
        state = {"w": torch.randn(64 * 1024)}  # 256 KiB: does not fit beside the hog

        skipper = make_checkpointer(daemon.address, "skipper", when_busy="skip")
        skipped = skipper.save(1, state)
        assert finishes(lambda: skipped.durable(timeout=60)) is False
        assert skipped.skipped and "daemon busy" in skipped.skip_reason
        skipper.wait(timeout_s=60)  # skipping is reported, never raised

        waiter = make_checkpointer(daemon.address, "waiter", when_busy="wait")
        waiting = waiter.save(1, state)
        assert not waiting.accepted(timeout=0.3)  # queued in the daemon, not dropped
        hog.release()
        waiting.wait_durable(timeout=120)
        assert waiter.steps() == [1]
    finally:
        hog.release()
        daemon.stop()


@pytest.fixture
def socket_path(tmp_path: Path) -> Path:
    return tmp_path / "d.sock"


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["auto", "grpc"])
def test_daemon_down_then_restarted_on_the_same_socket(
    tmp_path: Path,
    socket_path: Path,
    spawn_daemon: SpawnDaemon,
    make_checkpointer: CheckpointerFactory,
    transport: str,
) -> None:
    storage = tmp_path / "storage"
    listen = f"unix://{socket_path}"
    first = spawn_daemon(storage, "--listen", listen)
    # A short window, so that the calls made while the daemon is down give up quickly.
    ckpt = make_checkpointer(listen, "restarts", transport=transport, reconnect_timeout_s=2.0)
    assert ckpt.transport == ("shm" if transport == "auto" else "grpc")
    ckpt.save(1, {"w": torch.ones(10)}).wait_durable(timeout=120)

    first.kill()
    with pytest.raises(DaemonUnavailableError, match="no ckptd daemon answered"):
        finishes(ckpt.restore)
    lost = ckpt.save(2, {"w": torch.full((10,), 2.0)})
    assert isinstance(finishes(lambda: lost.exception(timeout=120)), DaemonUnavailableError)
    with pytest.raises(DaemonUnavailableError):
        ckpt.wait(timeout_s=120)

    spawn_daemon(storage, "--listen", listen)
    # The same checkpointer finds the new daemon; when (its channel's reconnect backoff, a
    # loaded machine) is not the point, so it is waited for rather than given the window.
    wait_until(partial(answers, ckpt), timeout_s=120, what="the restarted daemon to answer")
    ckpt.save(3, {"w": torch.full((10,), 3.0)}).wait_durable(timeout=120)
    assert ckpt.steps() == [1, 3]
    assert ckpt.restore()["w"].tolist() == [3.0] * 10
    assert ckpt.restore(1)["w"].tolist() == [1.0] * 10


@pytest.mark.slow  # ~1.4-1.8 s: the fast tier stays under 90 s
def test_a_save_made_while_the_daemon_restarts_goes_through(
    tmp_path: Path,
    socket_path: Path,
    spawn_daemon: SpawnDaemon,
    make_checkpointer: CheckpointerFactory,
) -> None:
    storage = tmp_path / "storage"
    listen = f"unix://{socket_path}"
    first = spawn_daemon(storage, "--listen", listen)
    ckpt = make_checkpointer(listen, "carry-on", reconnect_timeout_s=120.0)
    ckpt.save(1, {"w": torch.ones(4)}).wait_durable(timeout=120)
    first.kill()

    pending = ckpt.save(2, {"w": torch.full((4,), 2.0)})  # returns at once: snapshot only
    assert pending.state is SaveState.PENDING
    spawn_daemon(storage, "--listen", listen)
    pending.wait_durable(timeout=120)
    assert ckpt.steps() == [1, 2]


@pytest.mark.slow  # ~1.4-1.8 s: the fast tier stays under 90 s
def test_accepted_but_not_durable_save_lost_in_a_crash_is_reported(
    tmp_path: Path,
    socket_path: Path,
    spawn_daemon: SpawnDaemon,
    make_checkpointer: CheckpointerFactory,
) -> None:
    """A step the daemon accepted but had not committed when it was SIGKILLed is gone;
    after the restart the handle fails with SaveFailedError instead of hanging."""
    storage = tmp_path / "storage"
    listen = f"unix://{socket_path}"
    first = spawn_daemon(storage, "--listen", listen, "--encode-workers", "1")
    ckpt = make_checkpointer(listen, "lost", reconnect_timeout_s=120.0)
    handles = [ckpt.save(step, {"w": torch.randn(256 * 1024)}) for step in range(1, 9)]
    for handle in handles:
        assert handle.accepted(timeout=120)
    first.kill()
    spawn_daemon(storage, "--listen", listen)
    for handle in handles:
        finishes(partial(handle.exception, timeout=120))  # each one ends: no hang
    durable = {h.step for h in handles if h.state is SaveState.DURABLE}
    failed = [h for h in handles if h.state is SaveState.FAILED]
    assert durable | {h.step for h in failed} == set(range(1, 9))
    assert set(ckpt.steps()) == durable
    for handle in failed:
        assert isinstance(handle.exception(), SaveFailedError)
        assert "no longer knows it" in str(handle.exception())


@pytest.mark.slow  # over 2 s: the full suite (--all) runs it
def test_close_does_not_hang_while_the_daemon_is_down(
    tmp_path: Path, socket_path: Path, spawn_daemon: SpawnDaemon
) -> None:
    listen = f"unix://{socket_path}"
    spawn_daemon(tmp_path / "storage", "--listen", listen).kill()  # up, then gone
    with pytest.raises(DaemonUnavailableError):
        Checkpointer(listen, "down", connect_timeout_s=0.5)

    daemon = spawn_daemon(tmp_path / "storage", "--listen", listen)
    ckpt = Checkpointer(listen, "down", reconnect_timeout_s=600.0)
    daemon.kill()
    pending = ckpt.save(1, {"w": torch.ones(4)})  # retries for up to 10 minutes...
    finishes(lambda: ckpt.close(timeout_s=0.5))  # ...unless the checkpointer closes
    error = pending.exception(timeout=0)
    assert isinstance(error, DaemonUnavailableError | RequestCancelledError), error
