"""``snapshot="overlap"``: save() returns before the copy; guarded calls wait for it.

Copies are held back by a gate (a patched ``snapshot`` that waits on an event) so each test
decides exactly what the trainer does while a copy is pending, instead of racing a timer.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch
from ckptd.client import (
    Checkpointer,
    CkptdTimeoutError,
    SaveHandle,
    SaveState,
    SnapshotConflictError,
)
from ckptd.client import overlap as overlap_module
from client_support import CheckpointerFactory
from daemon_harness import InProcessDaemon, wait_until
from test_client_checkpointer import (
    ALL_EXACT,
    TRANSPORTS,
    assert_same_state,
    nested_state,
    same_bits,
)

# How long a call must stay blocked for the test to take it as waiting on the gate.
BLOCKED_S = 0.3


class CopyGate:
    """Holds every background copy until ``open()``; counts the copies that started."""

    def __init__(self) -> None:
        self.opened = threading.Event()
        self.started = threading.Semaphore(0)

    def open(self) -> None:
        self.opened.set()

    def assert_waits_for_copy(self, call: Callable[[], object], what: str) -> None:
        """Runs ``call`` on another thread: it must stay blocked while the gate holds the
        copy, and finish once the gate opens."""
        finished = threading.Event()
        runner = threading.Thread(target=lambda: (call(), finished.set()))
        runner.start()
        assert not finished.wait(BLOCKED_S), f"{what} ran while the copy was pending"
        self.open()
        runner.join(30)
        assert finished.is_set(), f"{what} did not finish after the copy"


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[CopyGate]:
    gate = CopyGate()
    real = overlap_module.snapshot

    def gated(*args: Any, **kwargs: Any) -> None:
        gate.started.release()
        assert gate.opened.wait(60), "the test never opened the copy gate"
        real(*args, **kwargs)

    monkeypatch.setattr(overlap_module, "snapshot", gated)
    yield gate
    gate.open()  # never leave a copy thread parked at teardown


def small_model(optimizer: str = "sgd") -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A model with batch norm (buffers the forward pass changes) and an optimizer with state
    (SGD's momentum, or Adam's moments and step counters)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(12, 32), torch.nn.BatchNorm1d(32), torch.nn.ReLU(), torch.nn.Linear(32, 3)
    )
    if optimizer == "adam":
        return model, torch.optim.Adam(model.parameters(), lr=0.01)
    return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(16, 12, generator=generator)
    labels = torch.randint(0, 3, (16,), generator=generator)
    optimizer.zero_grad()
    torch.nn.functional.cross_entropy(model(inputs), labels).backward()
    optimizer.step()


def training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    return {"model": model.state_dict(), "optim": optimizer.state_dict(), "epoch": 3}


def save_guarded_model(
    ckpt: Checkpointer, gate: CopyGate, *, trained: bool = False, kind: str = "sgd"
) -> tuple[torch.nn.Module, torch.optim.Optimizer, dict[str, Any], SaveHandle]:
    """Guards a fresh model and optimizer (after one step if ``trained``), saves them as
    step 1 and returns once the background copy has started and is held at the gate; the
    dict returned is the state at the save() call."""
    model, optimizer = small_model(kind)
    ckpt.guard(model, optimizer)
    if trained:
        train_step(model, optimizer, seed=0)
    expected = copy.deepcopy(training_state(model, optimizer))
    handle = ckpt.save(1, training_state(model, optimizer))
    assert gate.started.acquire(timeout=30), "the background copy never started"
    return model, optimizer, expected, handle


@pytest.mark.parametrize(
    ("transport", "kind"), [(t, "sgd") for t in TRANSPORTS] + [("shm", "adam")]
)
def test_guarded_training_step_waits_for_the_copy(
    daemon: InProcessDaemon,
    make_checkpointer: CheckpointerFactory,
    gate: CopyGate,
    transport: str,
    kind: str,
) -> None:
    """The next forward and backward pass run during the copy although the forward changes
    batch norm's running statistics (the guarded model's buffers were copied inside save());
    the optimizer's step waits; the checkpoint is the state at the save() call, optimizer
    state included (SGD's momentum; Adam's moments and step counters)."""
    ckpt = make_checkpointer(
        daemon.address, "guarded", transport=transport, policies=ALL_EXACT, snapshot="overlap"
    )
    model, optimizer, expected, handle = save_guarded_model(ckpt, gate, trained=True, kind=kind)
    assert handle.state is SaveState.PENDING
    forward = threading.Thread(target=lambda: model(torch.randn(16, 12)).sum().backward())
    forward.start()
    forward.join(30)
    assert not forward.is_alive(), "the forward pass waited for the copy"
    assert not torch.equal(model[1].running_mean, expected["model"]["1.running_mean"])
    gate.assert_waits_for_copy(optimizer.step, "optimizer.step()")

    handle.wait_durable(timeout=60)
    assert not torch.equal(model[0].weight, expected["model"]["0.weight"])
    assert_same_state(ckpt.restore(1), expected)


def test_buffers_of_guarded_modules_are_copied_inside_save(
    daemon: InProcessDaemon, make_checkpointer: CheckpointerFactory, gate: CopyGate
) -> None:
    """A buffer write that bypasses the version counter (DDP's broadcast, ``.data``) right
    after save() cannot reach the checkpoint: the buffers were copied before it returned."""
    ckpt = make_checkpointer(daemon.address, "buffers", policies=ALL_EXACT, snapshot="overlap")
    model, _, expected, _ = save_guarded_model(ckpt, gate)
    model[1].running_var.data.fill_(7.0)  # no version bump: only the early copy saves it
    gate.open()
    ckpt.wait(timeout_s=60)
    assert_same_state(ckpt.restore(1), expected)


def test_pending_copies_keep_save_order_and_wait_snapshot_times_out(
    daemon: InProcessDaemon, make_checkpointer: CheckpointerFactory, gate: CopyGate
) -> None:
    ckpt = make_checkpointer(daemon.address, "ordered", policies=ALL_EXACT, snapshot="overlap")
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    ckpt.guard(optimizer)
    states = [{"w": torch.full((500,), float(step))} for step in (1, 2)]
    handles = [ckpt.save(step, state) for step, state in zip((1, 2), states, strict=True)]
    assert gate.started.acquire(timeout=30)
    with pytest.raises(CkptdTimeoutError, match=r"still running after 0\.2 s"):
        ckpt.wait_snapshot(timeout_s=0.2)
    gate.open()
    ckpt.wait(timeout_s=60)
    assert [h.state for h in handles] == [SaveState.DURABLE] * 2
    assert ckpt.steps() == [1, 2]
    for step, state in zip((1, 2), states, strict=True):
        assert_same_state(ckpt.restore(step), state)


def test_overlap_without_an_optimizer_guard_warns_once(
    daemon: InProcessDaemon,
    make_checkpointer: CheckpointerFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    ckpt = make_checkpointer(daemon.address, "unguarded", snapshot="overlap")
    with caplog.at_level(logging.WARNING, logger="ckptd.client"):
        ckpt.save(1, {"w": torch.ones(10)})
        ckpt.save(2, {"w": torch.ones(10)})
    assert caplog.text.count("no optimizer is guarded") == 1


def test_unguarded_change_fails_the_save_and_sends_nothing(
    daemon: InProcessDaemon, make_checkpointer: CheckpointerFactory, gate: CopyGate
) -> None:
    ckpt = make_checkpointer(daemon.address, "conflict", policies=ALL_EXACT, snapshot="overlap")
    state = {"w": torch.ones(1000), "b": torch.zeros(10)}
    handle = ckpt.save(1, state)
    assert gate.started.acquire(timeout=30)
    state["w"].add_(1.0)  # neither guarded nor after wait_snapshot()
    gate.open()

    error = handle.exception(timeout=60)
    assert isinstance(error, SnapshotConflictError)
    assert "step 1" in str(error) and "'w'" in str(error) and "'b'" not in str(error)
    assert "wait_snapshot" in str(error)
    assert handle.state is SaveState.FAILED and not handle.accepted(0)
    with pytest.raises(SnapshotConflictError, match="'w'"):
        ckpt.wait(timeout_s=60)
    assert ckpt.steps() == []

    # The checkpointer carries on: the next save, made properly, lands whole.
    state["w"].add_(1.0)
    expected = copy.deepcopy(state)
    ckpt.save(2, state)
    ckpt.wait_snapshot(timeout_s=60)
    state["w"].add_(1.0)  # after wait_snapshot(): allowed
    ckpt.wait(timeout_s=60)
    assert ckpt.steps() == [2]
    assert_same_state(ckpt.restore(2), expected)


def test_leaves_without_version_counters_are_copied_before_save_returns(
    daemon: InProcessDaemon, make_checkpointer: CheckpointerFactory, gate: CopyGate
) -> None:
    """Numpy arrays and inference tensors cannot be checked for changes, so save() copies
    them at once; changing them while the tensors are still being copied is fine."""
    ckpt = make_checkpointer(daemon.address, "unversioned", policies=ALL_EXACT, snapshot="overlap")
    with torch.inference_mode():
        frozen = torch.arange(50, dtype=torch.float32)
    state = {"np": np.arange(8, dtype=np.int64), "frozen": frozen, "w": torch.randn(300)}
    expected = copy.deepcopy({**state, "frozen": frozen.clone()})

    ckpt.save(1, state)
    assert gate.started.acquire(timeout=30)
    state["np"] += 100
    with torch.inference_mode():
        frozen.add_(100.0)
    gate.open()
    ckpt.wait(timeout_s=60)
    restored = ckpt.restore(1)
    assert_same_state(restored, expected)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_nested_state_round_trips_through_overlapped_copies(
    daemon: InProcessDaemon, make_checkpointer: CheckpointerFactory, transport: str
) -> None:
    ckpt = make_checkpointer(
        daemon.address, "nested-overlap", transport=transport, policies=ALL_EXACT,
        snapshot="overlap",
    )  # fmt: skip

    def state() -> dict[str, Any]:
        # The background copy goes through numpy: strided views and bfloat16 included.
        grid = torch.arange(24.0).reshape(4, 6)
        return {**nested_state(), "t": grid.T, "bf": grid.to(torch.bfloat16)[:, ::2]}

    expected = {k: v.contiguous() if k in ("t", "bf") else v for k, v in state().items()}
    param = torch.nn.Parameter(torch.arange(15.0).reshape(3, 5))  # requires grad
    ckpt.save(1, {**state(), "param": param})
    ckpt.wait(timeout_s=60)
    restored = ckpt.restore(1)
    assert same_bits(restored.pop("param"), param.detach())
    assert_same_state(restored, expected)


def test_close_finishes_pending_copies_and_hands_them_over(
    daemon: InProcessDaemon, make_checkpointer: CheckpointerFactory, gate: CopyGate
) -> None:
    ckpt = make_checkpointer(daemon.address, "closing", policies=ALL_EXACT, snapshot="overlap")
    model, optimizer, expected, _ = save_guarded_model(ckpt, gate)
    closer = threading.Thread(target=ckpt.close)
    closer.start()
    gate.open()
    closer.join(60)
    assert not closer.is_alive()
    # close() removed the hooks: nothing is left registered on the model or optimizer.
    assert not model[1]._forward_pre_hooks and not optimizer._optimizer_step_pre_hooks

    reader = make_checkpointer(daemon.address, "closing", policies=ALL_EXACT)
    wait_until(lambda: reader.steps() == [1], timeout_s=60, what="step 1 to be committed")
    assert_same_state(reader.restore(1), expected)


def test_guard_hooks_only_what_changes_a_state(
    daemon: InProcessDaemon, make_checkpointer: CheckpointerFactory
) -> None:
    ckpt = make_checkpointer(daemon.address, "hooks", snapshot="overlap")
    model, optimizer = small_model()
    guard = ckpt.guard(model, optimizer)
    # The optimizer's step waits; the model gets no hook (its forward never waits), only
    # its buffers are marked to be copied inside save().
    assert len(guard.hooks) == 1 and optimizer._optimizer_step_pre_hooks
    assert not any(m._forward_pre_hooks for m in model.modules())
    assert guard.buffer_pointers() == {b.data_ptr() for b in model.buffers() if b.numel()}
    guard.remove()
    assert not optimizer._optimizer_step_pre_hooks and guard.buffer_pointers() == set()
    with pytest.raises(TypeError, match="got dict"):
        ckpt.guard({"w": torch.ones(2)})  # type: ignore[arg-type]


def test_snapshot_setting_is_checked(daemon: InProcessDaemon) -> None:
    from ckptd.client import Checkpointer

    with pytest.raises(ValueError, match="snapshot must be one of \\('copy', 'overlap'\\)"):
        Checkpointer(daemon.address, "bad", snapshot="lazy")


def test_guard_and_wait_snapshot_are_harmless_with_copying_saves(
    daemon: InProcessDaemon, make_checkpointer: CheckpointerFactory
) -> None:
    ckpt = make_checkpointer(daemon.address, "copying", policies=ALL_EXACT)
    model, optimizer = small_model()
    ckpt.guard(model, optimizer)
    expected = copy.deepcopy(training_state(model, optimizer))
    ckpt.save(1, training_state(model, optimizer))
    ckpt.wait_snapshot(timeout_s=0)  # the copy happened inside save()
    train_step(model, optimizer, seed=2)
    ckpt.wait(timeout_s=60)
    assert_same_state(ckpt.restore(1), expected)
