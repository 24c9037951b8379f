"""Issue 18 items 1-2 through the real daemon: retention keeps exactly what its policy says,
every kept step restores bit-identically to a run without retention, ``keep_best`` and
``max_bytes`` hold, a SIGKILL while retention deletes loses nothing kept; metrics are
stored and listed, ``should_save`` and ``best_step`` answer like Orbax's."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from ckptd.client import Checkpointer, Retention
from ckptd.daemon.config import EngineConfig
from daemon_harness import InProcessDaemon, SpawnDaemon, start_in_process, wait_until

_RNG = np.random.default_rng(18)
_A = _RNG.standard_normal(4096).astype(np.float32)
_B = _RNG.standard_normal(4096).astype(np.float32)


def state_for(step: int) -> dict[str, np.ndarray]:
    """Small and deterministic: ``w`` is lossy (4096 elements), ``step`` exact."""
    return {"w": _A + np.float32(0.01 * step) * _B, "step": np.array([step], dtype=np.int64)}


def loss_for(step: int) -> float:
    return float((step * 7919) % 101)  # distinct for the steps used, no order by step


@pytest.fixture
def small_bases(tmp_path: Path) -> Iterator[InProcessDaemon]:
    """A daemon writing a base every 5 saves, so that segments are short."""
    running = start_in_process(tmp_path / "storage", engine=EngineConfig(base_interval=5))
    try:
        yield running
    finally:
        running.stop()


def _save_all(ckpt: Checkpointer, steps: range, metrics: bool = False) -> None:
    for step in steps:
        ckpt.save(step, state_for(step),
                  metrics={"val_loss": loss_for(step)} if metrics else None)
    ckpt.wait(120)


def _settled(ckpt: Checkpointer, expected: list[int]) -> None:
    wait_until(lambda: ckpt.steps() == expected, 30, f"steps {expected}")


def _pinned(ckpt: Checkpointer, kept: set[int]) -> list[int]:
    """Waits until retention is done (every step kept or needed by a later kept one, at
    most one base's worth of such pinned steps per run of them) and returns the pinned."""
    def done() -> bool:
        infos = ckpt.step_infos()
        steps = {info.step for info in infos}
        if not kept <= steps:
            return False
        pinned, run_bytes, base_bytes = [], 0, 0
        for info in infos:
            if info.kind == "base":
                base_bytes, run_bytes = info.stored_bytes, 0
            if info.step in kept:
                run_bytes = 0
                continue
            later = [i for i in infos if i.step > info.step]
            needed = any(i.step in kept for i in later[: next(
                (n for n, i in enumerate(later) if i.kind == "base"), len(later))])
            run_bytes += info.stored_bytes
            if not needed or run_bytes > base_bytes * 17 // 16:
                return False
            pinned.append(info.step)
        found.append(pinned)
        return True

    found: list[list[int]] = []
    wait_until(done, 30, f"only steps {sorted(kept)} and their dependencies")
    return found[-1]


@pytest.mark.slow
def test_keep_last_and_every_keeps_exactly_those_steps_bit_identical(
    daemon: InProcessDaemon,
) -> None:
    policy = Retention(keep_last=5, keep_every=50)
    with Checkpointer(daemon.address, "kept", transport="grpc", retention=policy) as kept, \
            Checkpointer(daemon.address, "plain", transport="grpc") as plain:
        for step in range(200):
            kept.save(step, state_for(step))
            plain.save(step, state_for(step))
        kept.wait(120)
        plain.wait(120)
        expected = {0, 50, 100, 150, 195, 196, 197, 198, 199}
        pinned = _pinned(kept, expected)
        # A rewrite costs a base: it is done only when it frees more (here, once the 44
        # deltas 151..194 outweighed a base), so at most the base the keep_last window
        # grew from stays as a dependency.
        assert len(pinned) <= 1, pinned
        assert len(plain.steps()) == 200
        for step in sorted(expected | set(pinned)):
            ours, theirs = kept.restore_info(step), plain.restore_info(step)
            assert ours.checksum == theirs.checksum, step
            assert np.array_equal(ours.state["w"], theirs.state["w"]), step
            assert int(ours.state["step"][0]) == step


def test_keep_best_keeps_the_three_lowest_losses(small_bases: InProcessDaemon) -> None:
    policy = Retention(keep_best=3, best_metric="val_loss", best_mode="min")
    with Checkpointer(small_bases.address, "best", transport="grpc", retention=policy) as ckpt:
        _save_all(ckpt, range(30), metrics=True)
        best = sorted(range(30), key=loss_for)[:3]
        infos = {info.step: info for info in ckpt.step_infos()}
        assert 29 in infos  # the latest is always kept
        for step in best:
            assert infos[step].metrics == {"val_loss": loss_for(step)}
        _pinned(ckpt, {*best, 29})  # plus what they need, at most a base's worth each
        assert ckpt.best_step("val_loss") == best[0]
        for step in best:
            assert int(ckpt.restore(step)["step"][0]) == step


def test_max_bytes_caps_the_run(small_bases: InProcessDaemon) -> None:
    cap = 120_000
    with Checkpointer(small_bases.address, "capped", transport="grpc",
                      retention=Retention(max_bytes=cap)) as ckpt:
        _save_all(ckpt, range(60))
        wait_until(lambda: sum(i.stored_bytes for i in ckpt.step_infos()) <= cap, 30, "cap")
        steps = ckpt.steps()
        assert steps[-1] == 59 and steps == list(range(steps[0], 60))
        assert steps[0] % 5 == 0  # whole segments go
        assert int(ckpt.restore(steps[0])["step"][0]) == steps[0]


def test_metrics_should_save_and_steps_by_metric(daemon: InProcessDaemon) -> None:
    with Checkpointer(daemon.address, "orbaxy", transport="grpc",
                      save_interval_steps=10) as ckpt:
        assert ckpt.should_save(3)  # the first save of a run
        ckpt.save(3, state_for(3))
        ckpt.save(10, state_for(10), metrics={"val_loss": 0.5, "acc": 0.9})
        ckpt.save(20, state_for(20), metrics={"val_loss": 0.25})
        ckpt.wait(60)
        assert not ckpt.should_save(20) and not ckpt.should_save(25)
        assert ckpt.should_save(30)
        assert ckpt.steps() == [3, 10, 20]
        assert ckpt.steps(metric="val_loss") == [10, 20]
        assert ckpt.best_step("val_loss") == 20
        assert ckpt.best_step("acc", mode="max") == 10
        assert ckpt.best_step("missing") is None
        with pytest.raises(ValueError, match="finite"):
            ckpt.save(40, state_for(40), metrics={"val_loss": float("nan")})
    with Checkpointer(daemon.address, "orbaxy", transport="grpc",
                      save_interval_steps=10) as again:
        assert not again.should_save(20) and again.should_save(40)


def test_a_bad_policy_is_refused_before_anything_is_sent() -> None:
    with pytest.raises(ValueError, match="best_metric"):
        Retention(keep_best=2)
    with pytest.raises(ValueError, match="best_mode"):
        Retention(keep_best=2, best_metric="loss", best_mode="lowest")


@pytest.mark.slow
def test_sigkill_while_retention_deletes_loses_nothing_kept(
    tmp_path: Path, spawn_daemon: SpawnDaemon
) -> None:
    storage = tmp_path / "storage"
    first = spawn_daemon(storage, "--base-interval", "4")
    with Checkpointer(first.address, "crash", transport="grpc") as ckpt:
        _save_all(ckpt, range(120))
        expected = {step: ckpt.restore_info(step).checksum for step in (0, 60, 116, 119)}
    policy = Retention(keep_last=4, keep_every=60)
    # Setting the policy starts the deletions in the background: kill while they run.
    with Checkpointer(first.address, "crash", transport="grpc", retention=policy):
        time.sleep(0.01)
    first.kill()
    second = spawn_daemon(storage, "--base-interval", "4")
    with Checkpointer(second.address, "crash", transport="grpc") as ckpt:
        _settled(ckpt, [0, 60, 116, 117, 118, 119])  # the restart finishes the job
        for step, checksum in expected.items():
            assert ckpt.restore_info(step).checksum == checksum, step
    second.terminate()
