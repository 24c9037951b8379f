"""The Checkpointer against a real in-process daemon, over both transports."""

from __future__ import annotations

import copy
import logging
import math
import subprocess
import sys
import threading
from collections import OrderedDict
from typing import Any

import numpy as np
import pytest
import torch
from ckptd.client import (
    CheckpointNotFoundError,
    SaveState,
    StepConflictError,
)
from ckptd.client.shm import ShmTransport
from client_support import CheckpointerFactory
from daemon_harness import InProcessDaemon, wait_until

ALL_EXACT = [("*", "exact")]
TRANSPORTS = ["shm", "grpc"]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality (NaNs and -0.0 included), dtype and shape too."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def assert_same_state(got: Any, want: Any, path: str = "state") -> None:
    """Recursive comparison: containers and their types, tensors bit for bit, scalars."""
    assert type(got) is type(want), f"{path}: {type(got)} != {type(want)}"
    if isinstance(want, torch.Tensor):
        assert same_bits(got, want), f"{path}: tensors differ"
    elif isinstance(want, np.ndarray):
        assert got.dtype == want.dtype and np.array_equal(got, want), f"{path}: arrays differ"
    elif isinstance(want, dict):
        assert list(got) == list(want), f"{path}: keys differ"
        for key in want:
            assert_same_state(got[key], want[key], f"{path}[{key!r}]")
    elif isinstance(want, list | tuple):
        assert len(got) == len(want), f"{path}: lengths differ"
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_same_state(g, w, f"{path}[{i}]")
    elif isinstance(want, float) and math.isnan(want):
        assert math.isnan(got), path
    else:
        assert got == want, f"{path}: {got!r} != {want!r}"


def nested_state(seed: int = 0) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(seed)
    model = OrderedDict(
        [
            ("fc.weight", torch.randn(64, 48, generator=generator)),
            ("fc.bias", torch.randn(64, generator=generator).to(torch.bfloat16)),
            ("bn.num_batches_tracked", torch.tensor(12, dtype=torch.int64)),
            ("mask", torch.rand(10, generator=generator) > 0.5),
            ("empty", torch.empty(0, 5)),
            ("half", torch.randn(7, generator=generator).to(torch.float16)),
        ]
    )
    return {
        "model": model,
        "optim": {
            "state": {
                0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(64, 48, generator=generator)}
            },
            "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.999), "params": [0], "foreach": None}],
        },
        "step": 7,
        "loss": float("nan"),
        "best": -math.inf,
        "name": "run/\u00e9t\u00e9",
        "blob": b"\x00\x01",
        "np": np.arange(6, dtype=np.int32).reshape(2, 3),
        "rng": torch.get_rng_state(),
    }


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_nested_state_round_trips_bit_exact(
    daemon: InProcessDaemon, make_checkpointer: CheckpointerFactory, transport: str
) -> None:
    ckpt = make_checkpointer(daemon.address, "nested", transport=transport, policies=ALL_EXACT)
    assert ckpt.transport == transport
    state = nested_state()
    handle = ckpt.save(5, state)
    assert handle.accepted(timeout=60)
    handle.wait_durable(timeout=60)
    assert handle.state is SaveState.DURABLE and handle.exception() is None

    restored = ckpt.restore_info()
    assert restored.step == 5
    assert_same_state(restored.state, state)
    assert_same_state(ckpt.restore(5, map_location="cpu"), state)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_mutating_after_save_leaves_the_checkpoint_intact(
    daemon: InProcessDaemon, make_checkpointer: CheckpointerFactory, transport: str
) -> None:
    ckpt = make_checkpointer(daemon.address, "mutate", transport=transport, policies=ALL_EXACT)
    state = nested_state()
    expected = copy.deepcopy(state)
    handles = []
    for step in (1, 2, 3):
        expected = copy.deepcopy(state)
        handles.append(ckpt.save(step, state))
        # The trainer moves on at once: every tensor changes in place, the dicts too.
        state["model"]["fc.weight"].add_(1000.0)
        state["optim"]["state"][0]["exp_avg"].zero_()
        state["np"] += 5
        state["step"] += 1
    ckpt.wait(timeout_s=120)
    assert [h.state for h in handles] == [SaveState.DURABLE] * 3
    assert_same_state(ckpt.restore(3), expected)


def test_lossy_tensors_stay_within_the_codec_bound(
    daemon: InProcessDaemon, make_checkpointer: CheckpointerFactory
) -> None:
    """With the default policy big float tensors go through the lossy delta codec: each
    element's error is at most that step's delta against the previous reconstruction
    (a quantized element lands in its own exponent bucket; a dropped one becomes 0)."""
    ckpt = make_checkpointer(daemon.address, "lossy", bits=3)
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(256, 64, generator=generator)
    counter = torch.arange(2000, dtype=torch.int64)
    saved = {}
    for step in range(1, 6):
        weight += 0.01 * torch.randn(weight.shape, generator=generator)
        counter += 1
        saved[step] = (weight.clone(), counter.clone())
        ckpt.save(step, {"w": weight, "c": counter})
    ckpt.wait(timeout_s=120)

    infos = {info.step: info for info in ckpt.step_infos()}
    previous: torch.Tensor | None = None
    lossy_seen = False
    for step in range(1, 6):
        restored = ckpt.restore(step)
        want_w, want_c = saved[step]
        assert same_bits(restored["c"], want_c)  # integers are always exact
        got = restored["w"]
        assert got.dtype == torch.float32 and got.shape == want_w.shape
        if infos[step].kind == "base":
            assert same_bits(got, want_w)
        else:
            assert previous is not None and infos[step].parent_step == step - 1
            delta = (want_w - previous).abs()
            error = (got - want_w).abs()
            slack = 1e-6 * want_w.abs() + 1e-30
            assert bool((error <= delta + slack).all()), f"step {step}: error beyond the bound"
            lossy_seen = lossy_seen or not torch.equal(got, want_w)
        previous = got
    assert lossy_seen, "no step was stored lossily; the bound was never exercised"


def test_auto_transport_uses_shared_memory_on_this_host(
    daemon: InProcessDaemon, make_checkpointer: CheckpointerFactory
) -> None:
    ckpt = make_checkpointer(daemon.address, "auto")
    assert ckpt.server_info.shared_memory
    assert ckpt.transport == "shm"


def test_shm_refused_by_the_daemon_falls_back_to_streaming(
    daemon: InProcessDaemon,
    make_checkpointer: CheckpointerFactory,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A daemon in another container cannot open our segment; the daemon answers
    INVALID_ARGUMENT naming the shared memory, and the client streams instead."""
    real_send = ShmTransport.send

    def send_elsewhere(self: ShmTransport, header: Any, buffer: Any, layout: Any) -> Any:
        buffer.name = "ckptdc_0_not_on_this_host"  # what a different /dev/shm looks like
        return real_send(self, header, buffer, layout)

    monkeypatch.setattr(ShmTransport, "send", send_elsewhere)
    ckpt = make_checkpointer(daemon.address, "fallback", policies=ALL_EXACT)
    assert ckpt.transport == "shm"
    state = {"w": torch.randn(100, 10)}
    with caplog.at_level(logging.WARNING, logger="ckptd.client"):
        ckpt.save(1, state).wait_durable(timeout=60)
    assert ckpt.transport == "grpc"
    assert "streaming checkpoints over gRPC instead" in caplog.text
    ckpt.save(2, state).wait_durable(timeout=60)
    assert same_bits(ckpt.restore(2)["w"], state["w"])


def test_steady_saves_reuse_staging_buffers(
    daemon: InProcessDaemon, make_checkpointer: CheckpointerFactory
) -> None:
    ckpt = make_checkpointer(daemon.address, "reuse", transport="shm")
    state = {"w": torch.randn(1000, 100)}
    for step in range(1, 11):
        state["w"].add_(0.01)
        ckpt.save(step, state).wait_accepted(timeout=60)
    assert ckpt.staging_pool.stats.allocations == 1
    assert ckpt.staging_pool.buffers == 1
    ckpt.wait(timeout_s=120)


def test_steps_latest_and_delete(
    daemon: InProcessDaemon, make_checkpointer: CheckpointerFactory
) -> None:
    ckpt = make_checkpointer(daemon.address, "listing", policies=ALL_EXACT)
    assert ckpt.steps() == [] and ckpt.latest_step() is None
    with pytest.raises(CheckpointNotFoundError, match="listing"):
        ckpt.restore()
    for step in (10, 20, 30):
        ckpt.save(step, {"x": torch.full((4,), float(step))})
    ckpt.wait(timeout_s=120)
    assert ckpt.steps() == [10, 20, 30] and ckpt.latest_step() == 30
    infos = ckpt.step_infos()
    assert infos[0].kind == "base" and infos[0].raw_bytes == 16
    assert ckpt.delete_step(20) >= 1
    assert ckpt.steps() == [10, 30]
    assert ckpt.restore(30)["x"].tolist() == [30.0] * 4
    with pytest.raises(CheckpointNotFoundError):
        ckpt.restore(20)


def test_wait_raises_a_failed_save_once(
    daemon: InProcessDaemon, make_checkpointer: CheckpointerFactory
) -> None:
    first = make_checkpointer(daemon.address, "conflict")
    second = make_checkpointer(daemon.address, "conflict")
    first.save(50, {"x": torch.ones(2)}).wait_accepted(timeout=60)
    handle = second.save(40, {"x": torch.ones(2)})  # not after the run's latest step
    assert not handle.durable(timeout=60)
    assert isinstance(handle.exception(), StepConflictError)
    with pytest.raises(StepConflictError, match="step 40"):
        second.wait(timeout_s=60)
    second.wait(timeout_s=60)  # reported once
    first.wait(timeout_s=60)


class BlockedSends:
    """Holds the sender thread inside ``send`` until released, so the staging buffers
    stay busy for as long as a test needs."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, transport_cls: Any) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        real_send = transport_cls.send

        def send(transport: Any, *args: Any) -> Any:
            self.entered.set()
            assert self.release.wait(60), "test never released the sender"
            return real_send(transport, *args)

        monkeypatch.setattr(transport_cls, "send", send)


def test_skip_when_every_staging_buffer_is_busy(
    daemon: InProcessDaemon,
    make_checkpointer: CheckpointerFactory,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    blocked = BlockedSends(monkeypatch, ShmTransport)
    ckpt = make_checkpointer(
        daemon.address, "skip", transport="shm", staging_buffers=1, when_busy="skip"
    )
    first = ckpt.save(1, {"x": torch.ones(3)})
    assert blocked.entered.wait(60)
    with caplog.at_level(logging.WARNING, logger="ckptd.client"):
        second = ckpt.save(2, {"x": torch.ones(3)})
    assert second.skipped and "when_busy='skip'" in second.skip_reason
    assert "skipped checkpoint step 2" in caplog.text
    blocked.release.set()
    ckpt.wait(timeout_s=60)  # a skip is not a failure
    assert first.state is SaveState.DURABLE
    assert ckpt.steps() == [1]
    assert ckpt.save(3, {"x": torch.ones(3)}).durable(timeout=60)


def test_wait_policy_gives_up_after_busy_timeout(
    daemon: InProcessDaemon, make_checkpointer: CheckpointerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocked = BlockedSends(monkeypatch, ShmTransport)
    ckpt = make_checkpointer(
        daemon.address, "busywait", transport="shm", staging_buffers=1, busy_timeout_s=0.2
    )
    ckpt.save(1, {"x": torch.ones(3)})
    assert blocked.entered.wait(60)
    second = ckpt.save(2, {"x": torch.ones(3)})
    assert second.skipped and "busy_timeout_s" in second.skip_reason
    blocked.release.set()
    ckpt.wait(timeout_s=60)
    assert ckpt.steps() == [1]


def test_invalid_calls_fail_in_the_trainer_with_clear_messages(
    daemon: InProcessDaemon, make_checkpointer: CheckpointerFactory
) -> None:
    with pytest.raises(ValueError, match=r"invalid run name '\.hidden'"):
        make_checkpointer(daemon.address, ".hidden")
    with pytest.raises(ValueError, match="invalid policy 'fast'"):
        make_checkpointer(daemon.address, "ok", policies=[("*", "fast")])
    ckpt = make_checkpointer(daemon.address, "ok")
    with pytest.raises(TypeError, match=r"state\['model'\]\['act'\].*ReLU"):
        ckpt.save(1, {"model": {"act": torch.nn.ReLU()}})
    with pytest.raises(ValueError, match="reserved"):
        ckpt.save(1, {"x": torch.ones(1)}, metadata={"ckptd.structure": "{}"})
    ckpt.save(2, {"x": torch.ones(1)})
    with pytest.raises(ValueError, match="step 2 is not after step 2"):
        ckpt.save(2, {"x": torch.ones(1)})
    ckpt.close()
    with pytest.raises(RuntimeError, match="closed"):
        ckpt.save(3, {"x": torch.ones(1)})


@pytest.mark.slow  # ~1.4-1.8 s: the fast tier stays under 90 s
def test_a_checkpointer_left_open_at_exit_hands_over_and_cleans_up(
    daemon: InProcessDaemon, make_checkpointer: CheckpointerFactory
) -> None:
    script = (
        "import sys, torch\n"
        "from ckptd.client import Checkpointer\n"
        "ckpt = Checkpointer(sys.argv[1], 'left-open', transport='shm')\n"
        "ckpt.save(1, {'w': torch.arange(1000.0)})\n"
        "print(ckpt.staging_pool.buffers, flush=True)\n"
    )  # exits without close() or wait()
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", script, daemon.address],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "1"
    assert "leaked shared_memory" not in done.stderr  # unlinked by the client, not the tracker
    ckpt = make_checkpointer(daemon.address, "left-open")
    wait_until(lambda: ckpt.steps() == [1], what="the handed-over step to become durable")
    assert ckpt.restore(1)["w"].tolist() == list(map(float, range(1000)))
