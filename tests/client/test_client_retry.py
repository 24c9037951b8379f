"""The retry policy against real daemons: slow restarts, a stalled daemon, give-up, and
errors that must not be retried (``client/retry.py``)."""

from __future__ import annotations

import logging
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from ckptd.client import (
    Checkpointer,
    CheckpointNotFoundError,
    CkptdClientError,
    DaemonUnavailableError,
    SaveHandle,
    SaveState,
)
from ckptd.client.retry import Backoff, is_transient
from client_support import CheckpointerFactory
from daemon_harness import DaemonProcess, start_in_process

SpawnDaemon = Callable[..., DaemonProcess]
# Short settings so each test takes seconds: every outage below outlasts CALL_TIMEOUT_S
# (one attempt's deadline) and ends well inside RECONNECT_TIMEOUT_S.
CALL_TIMEOUT_S = 1.0
RECONNECT_TIMEOUT_S = 20.0
OUTAGE_S = 2.5


@pytest.fixture
def later() -> Iterator[Callable[[float, Callable[[], object]], None]]:
    """``later(delay_s, fn)`` runs ``fn`` on a timer thread. Teardown cancels and joins
    every timer before the daemons are killed, so no daemon starts after the test (a
    stopped daemon needs no SIGCONT: SIGKILL ends it anyway)."""
    timers: list[threading.Timer] = []

    def schedule(delay_s: float, fn: Callable[[], object]) -> None:
        timer = threading.Timer(delay_s, fn)
        timer.daemon = True
        timers.append(timer)
        timer.start()

    yield schedule
    for timer in timers:
        timer.cancel()
        timer.join()


def save_steps(ckpt: Checkpointer, first: int, count: int) -> list[SaveHandle]:
    """What the training loop does while the daemon is away: saves, which return at once."""
    return [ckpt.save(step, {"w": torch.full((256,), float(step))})
            for step in range(first, first + count)]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("transport", ["auto", "grpc"])
def test_saves_made_while_the_daemon_restarts_slowly_become_durable(
    tmp_path: Path,
    spawn_daemon: SpawnDaemon,
    make_checkpointer: CheckpointerFactory,
    later: Callable[[float, Callable[[], object]], None],
    transport: str,
) -> None:
    """The socket is gone for longer than a call's deadline (UNAVAILABLE throughout), and
    the new daemon comes up from a timer; nothing raises in the training loop."""
    storage, listen = tmp_path / "storage", f"unix://{tmp_path / 'd.sock'}"
    first = spawn_daemon(storage, "--listen", listen)
    ckpt = make_checkpointer(
        listen, "slow-restart", transport=transport,
        call_timeout_s=CALL_TIMEOUT_S, reconnect_timeout_s=RECONNECT_TIMEOUT_S,
    )  # fmt: skip
    ckpt.save(1, {"w": torch.full((256,), 1.0)}).wait_durable(timeout=60)

    first.kill()
    down_at = time.monotonic()
    later(OUTAGE_S, lambda: spawn_daemon(storage, "--listen", listen))
    handles = save_steps(ckpt, 2, 2)  # two staging buffers: neither save waits
    assert all(h.state is SaveState.PENDING for h in handles)  # save() returned at once
    steps = ckpt.steps()  # waits for the new daemon instead of raising
    assert time.monotonic() - down_at > CALL_TIMEOUT_S
    assert steps[0] == 1 and set(steps) <= {1, 2, 3}
    assert ckpt.restore(1)["w"].tolist() == [1.0] * 256

    ckpt.wait(timeout_s=60)  # every save durable: nothing failed
    assert ckpt.steps() == [1, 2, 3]
    assert ckpt.restore()["w"].tolist() == [3.0] * 256


@pytest.mark.slow
def test_a_stalled_daemon_is_waited_for_not_timed_out(
    tmp_path: Path,
    spawn_daemon: SpawnDaemon,
    make_checkpointer: CheckpointerFactory,
    later: Callable[[float, Callable[[], object]], None],
) -> None:
    """CPU starvation: a SIGSTOPped daemon still accepts connections (the kernel does) but
    answers nothing, so each attempt ends in DEADLINE_EXCEEDED; readiness, listing, saves
    and their durability checks wait it out."""
    daemon = spawn_daemon(tmp_path / "storage", "--listen", f"unix://{tmp_path / 'd.sock'}")
    settings = {"call_timeout_s": CALL_TIMEOUT_S, "reconnect_timeout_s": RECONNECT_TIMEOUT_S}
    ckpt = make_checkpointer(daemon.address, "stalled", transport="grpc", **settings)
    ckpt.save(1, {"w": torch.full((256,), 1.0)}).wait_durable(timeout=60)

    os.kill(daemon.pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    later(OUTAGE_S, lambda: os.kill(daemon.pid, signal.SIGCONT))
    handles = save_steps(ckpt, 2, 2)
    with ThreadPoolExecutor(1) as pool:
        # A checkpointer connecting now: its first GetServerInfo times out, and is retried;
        # meanwhile the trainer lists its steps over the connection it already has.
        joining = pool.submit(
            make_checkpointer, daemon.address, "newcomer", connect_timeout_s=20.0, **settings
        )
        assert ckpt.steps()[0] == 1
        assert time.monotonic() - stopped_at > CALL_TIMEOUT_S
        newcomer = joining.result(timeout=60)
    assert newcomer.steps() == []

    ckpt.wait(timeout_s=60)
    assert all(h.state is SaveState.DURABLE for h in handles)
    assert ckpt.steps() == [1, 2, 3]


def test_permanent_errors_fail_at_once(
    tmp_path: Path, make_checkpointer: CheckpointerFactory, caplog: pytest.LogCaptureFixture
) -> None:
    daemon = start_in_process(tmp_path / "storage")
    try:
        ckpt = make_checkpointer(daemon.address, "permanent", reconnect_timeout_s=60.0)
        ckpt.save(1, {"w": torch.ones(4)}).wait_durable(timeout=60)
        caplog.set_level(logging.INFO, logger="ckptd.client")
        start = time.monotonic()
        with pytest.raises(CheckpointNotFoundError, match="step 7"):
            ckpt.restore(7)
        # A delete's first attempt that finds nothing is an error, not "already done".
        with pytest.raises(CheckpointNotFoundError, match="delete step 7"):
            ckpt.delete_step(7)
        assert time.monotonic() - start < 30  # far inside the 60 s window
        assert not [r for r in caplog.records if "retrying" in r.getMessage()]
        assert ckpt.steps() == [1]
    finally:
        daemon.stop()


def test_after_the_whole_window_one_clear_error(
    tmp_path: Path, make_checkpointer: CheckpointerFactory
) -> None:
    daemon = start_in_process(tmp_path / "storage")
    ckpt = make_checkpointer(daemon.address, "gone", reconnect_timeout_s=0.5)
    ckpt.save(1, {"w": torch.ones(4)}).wait_durable(timeout=60)
    daemon.stop()

    start = time.monotonic()
    with pytest.raises(DaemonUnavailableError) as info:
        ckpt.steps()
    assert time.monotonic() - start >= 0.5  # it retried for the whole window
    message = str(info.value)
    assert message.startswith("list steps of run 'gone' rank 0: no ckptd daemon answered at ")
    assert repr(daemon.address) in message and "within reconnect_timeout_s=0.5 s" in message
    attempts = re.search(r"\((\d+) attempts over (\d+\.\d) s\)", message)
    assert attempts and int(attempts.group(1)) > 1, message
    assert "(gRPC status UNAVAILABLE)" in message
    assert info.value.code == "UNAVAILABLE"
    assert isinstance(info.value.__cause__, DaemonUnavailableError)

    lost = ckpt.save(2, {"w": torch.ones(4)})  # the loop goes on; the handle says why
    error = lost.exception(timeout=60)
    assert isinstance(error, DaemonUnavailableError), error
    assert "save step 2 of run 'gone'" in str(error) and "reconnect_timeout_s=0.5 s" in str(error)
    with pytest.raises(DaemonUnavailableError):
        ckpt.wait(timeout_s=60)


def _failure(code: str, reason: str | None = None) -> CkptdClientError:
    error = CkptdClientError(code)
    error.code, error.reason = code, reason
    return error


@pytest.mark.parametrize(
    ("code", "reason", "idempotent", "transient"),
    [
        ("UNAVAILABLE", None, False, True),
        ("UNAVAILABLE", "ERROR_REASON_SHUTTING_DOWN", False, True),
        ("UNAVAILABLE", "ERROR_REASON_STORAGE_UNAVAILABLE", True, False),
        ("DEADLINE_EXCEEDED", None, True, True),
        ("DEADLINE_EXCEEDED", None, False, False),
        ("CANCELLED", None, True, True),
        ("CANCELLED", None, False, False),
        ("NOT_FOUND", "ERROR_REASON_STEP_NOT_FOUND", True, False),
        ("INVALID_ARGUMENT", None, True, False),
        ("ALREADY_EXISTS", "ERROR_REASON_STEP_EXISTS", False, False),
        ("RESOURCE_EXHAUSTED", "ERROR_REASON_BUSY", True, False),
        ("INTERNAL", None, True, False),
    ],
)
def test_which_failures_are_transient(
    code: str, reason: str | None, idempotent: bool, transient: bool
) -> None:
    assert is_transient(_failure(code, reason), idempotent=idempotent) is transient


def test_backoff_doubles_to_its_cap_with_jitter_below_nominal() -> None:
    backoff = Backoff()
    assert [backoff.pause_s(n, draw=lambda: 0.0) for n in range(7)] == [
        0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0,
    ]  # fmt: skip
    assert backoff.pause_s(10, draw=lambda: 1.0) == pytest.approx(1.0)
    assert backoff.pause_s(10_000, draw=lambda: 0.0) == 2.0
