"""Issue 18 items 1-2 through the real daemon: retention keeps exactly what its policy says,
every kept step restores bit-identically to a run without retention (also after a rewrite
and an eviction or restart), the steps a kept one still needs are hidden, ``keep_best`` and
``max_bytes`` hold, a SIGKILL in the middle of a deletion or a rewrite loses nothing kept
and the restart converges; metrics are stored and listed, ``should_save`` and
``best_step`` answer like Orbax's."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from ckptd.client import Checkpointer, Retention
from ckptd.client.errors import CheckpointNotFoundError
from ckptd.daemon.cli.app import main as cli_main
from ckptd.daemon.config import EngineConfig
from ckptd.daemon.domain import RunInfo
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


def _run_info(daemon: InProcessDaemon, run: str) -> RunInfo:
    return next(info for info in daemon.call(lambda e: e.list_runs()) if info.run == run)


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
        expected = [0, 50, 100, 150, 195, 196, 197, 198, 199]
        _settled(kept, expected)
        assert len(plain.steps()) == 200
        for step in expected:
            ours, theirs = kept.restore_info(step), plain.restore_info(step)
            assert ours.checksum == theirs.checksum, step
            assert np.array_equal(ours.state["w"], theirs.state["w"]), step
            assert int(ours.state["step"][0]) == step
        # 151..194 are no steps any more (hidden while 195 restores through them).
        with pytest.raises(CheckpointNotFoundError):
            kept.restore(194)
        # 150's segment is the open one: once its hidden deltas outweigh four rewrites,
        # the window's oldest step is rewritten as a base and they go.
        base = max(i.stored_bytes for i in kept.step_infos() if i.kind == "base")
        wait_until(lambda: _run_info(daemon, "kept").hidden_bytes <= 4 * base * 17 // 16,
                   30, "hidden bytes under four rewrites")
        info = _run_info(daemon, "kept")
        assert info.step_count == len(expected)
        assert info.stored_bytes == info.hidden_bytes + sum(
            i.stored_bytes for i in kept.step_infos())
        assert np.array_equal(kept.restore(197)["w"], plain.restore(197)["w"])


def test_keep_best_keeps_the_three_lowest_losses(small_bases: InProcessDaemon) -> None:
    policy = Retention(keep_best=3, best_metric="val_loss", best_mode="min")
    with Checkpointer(small_bases.address, "best", transport="grpc", retention=policy) as ckpt:
        _save_all(ckpt, range(30), metrics=True)
        best = sorted(range(30), key=loss_for)[:3]
        infos = {info.step: info for info in ckpt.step_infos()}
        assert 29 in infos  # the latest is always kept
        for step in best:
            assert infos[step].metrics == {"val_loss": loss_for(step)}
        _settled(ckpt, sorted({*best, 29}))  # exactly, what they need hidden
        # The three best (0, 5, 10) are bases: nothing before them is hidden; 29 (the
        # latest) restores through 25..28, hidden (under four rewrites: not rewritten).
        assert _run_info(small_bases, "best").hidden_steps == 4
        with pytest.raises(CheckpointNotFoundError, match="removed by the run's retention"):
            ckpt.restore(27)
        assert ckpt.best_step("val_loss") == best[0]
        for step in best:
            assert int(ckpt.restore(step)["step"][0]) == step


def test_deleting_a_step_takes_the_hidden_steps_that_need_it(
    small_bases: InProcessDaemon, capsys: pytest.CaptureFixture[str],
) -> None:
    with Checkpointer(small_bases.address, "holes", transport="grpc",
                      retention=Retention(keep_every=3, keep_last=1)) as ckpt:
        _save_all(ckpt, range(10))  # bases 0 and 5
        _settled(ckpt, [0, 3, 6, 9])
        wait_until(lambda: _run_info(small_bases, "holes").hidden_steps == 5, 30,
                   "1, 2, 5, 7 and 8 hidden")
        with pytest.raises(CheckpointNotFoundError, match="removed by the run's retention"):
            ckpt.restore(7)
        capsys.readouterr()
        assert cli_main(["ls", "--json", "--target", small_bases.address], {}) == 0
        (listed,) = [r for r in json.loads(capsys.readouterr().out) if r["run"] == "holes"]
        info = _run_info(small_bases, "holes")
        assert (listed["step_count"], listed["hidden_steps"]) == (4, 5)
        assert listed["hidden_bytes"] == info.hidden_bytes > 0
        assert cli_main(["ls", "--target", small_bases.address], {}) == 0
        row = next(line for line in capsys.readouterr().out.splitlines() if "holes" in line)
        assert "(5)" in row  # the HIDDEN column: bytes (steps)
        checksums = {step: ckpt.restore_info(step).checksum for step in (3, 9)}
        # 6's dependants 7 and 8 are hidden: they go with it, and 9 is rewritten as a base;
        # 0's are 1 and 2: 3 is rewritten. Then 5 restores nothing kept: retention drops it.
        assert ckpt.delete_step(6) == 1 and ckpt.delete_step(0) == 1
        assert ckpt.steps() == [3, 9]
        wait_until(lambda: _run_info(small_bases, "holes").hidden_steps == 0, 30,
                   "no hidden step left")
        assert [info.kind for info in ckpt.step_infos()] == ["base", "base"]
        for step, checksum in checksums.items():
            assert ckpt.restore_info(step).checksum == checksum, step


def test_max_bytes_caps_the_run(small_bases: InProcessDaemon) -> None:
    cap = 120_000
    with Checkpointer(small_bases.address, "capped", transport="grpc",
                      retention=Retention(max_bytes=cap)) as ckpt:
        _save_all(ckpt, range(60))
        # Every stored byte counts, hidden ones included.
        wait_until(lambda: _run_info(small_bases, "capped").stored_bytes <= cap, 30, "cap")
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


def _mid_deletion(storage: Path, run: str) -> list[str]:
    """Step directories of ``run`` a deletion left half done: marked, without manifest."""
    return [d.name for d in (storage / "runs" / run / "0").iterdir()
            if (d / "pending").exists() and not (d / "manifest.json").exists()]


@pytest.mark.slow
@pytest.mark.parametrize("case", [
    ("group-manifests-deleted", "4", Retention(keep_last=4, keep_every=60),
     [0, 60, 116, 117, 118, 119]),
    # Bases only once deltas outweigh 8 bases: the 29 hidden deltas before 30, kept for
    # good, outweigh a rewrite, so 30 is rewritten.
    ("rebase-blobs-written", "1000", Retention(keep_last=1, keep_every=30), [0, 30, 60, 90, 119]),
], ids=["delete", "rewrite"])
def test_sigkill_mid_retention_loses_nothing_kept_and_converges(
    tmp_path: Path, spawn_daemon: SpawnDaemon, case: tuple[str, str, Retention, list[int]],
) -> None:
    point, base_interval, policy, expected = case
    storage, paused = tmp_path / "storage", tmp_path / "paused"
    first = spawn_daemon(storage, "--base-interval", base_interval,
                         "--test-pause-at", f"{point}:{paused}")
    with Checkpointer(first.address, "crash", transport="grpc") as ckpt:
        _save_all(ckpt, range(120))
        checksums = {step: ckpt.restore_info(step).checksum for step in expected}
    # Setting the policy starts retention in the background, which stops between two
    # storage operations of a deletion or a rewrite.
    with Checkpointer(first.address, "crash", transport="grpc", retention=policy):
        wait_until(paused.exists, 60, f"retention to reach {point}")
    assert paused.read_text() == point
    first.kill()
    if point == "group-manifests-deleted":
        assert _mid_deletion(storage, "crash")  # manifests gone, blobs still there
    else:
        assert list((storage / "runs/crash/0" / f"{30:020d}").glob("*.r*.blob"))
    second = spawn_daemon(storage, "--base-interval", base_interval)
    with Checkpointer(second.address, "crash", transport="grpc") as ckpt:
        _settled(ckpt, expected)  # the restart finishes the job, exactly
        for step, checksum in checksums.items():
            assert ckpt.restore_info(step).checksum == checksum, step
        if point == "rebase-blobs-written":
            wait_until(lambda: ckpt.step_infos()[1].kind == "base", 30, "the rewrite")
            assert ckpt.restore_info(30).checksum == checksums[30]
        wait_until(lambda: not _mid_deletion(storage, "crash"), 30, "deletions finished")
    second.terminate()


@pytest.mark.parametrize("disturb", ["evict", "restart"])
def test_saves_after_a_rewrite_restore_like_a_run_without_retention(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, disturb: str,
) -> None:
    """Lossless: after retention rewrote kept deltas as bases, evicting the chain's head
    or restarting the daemon changes nothing a later save restores to."""
    caplog.set_level(logging.INFO, "ckptd.engine")
    storage = tmp_path / "storage"
    engine = EngineConfig(base_interval=1000, max_resident_bytes=1 if disturb == "evict"
                          else 4 << 30)
    policy = Retention(keep_last=1, keep_every=8)
    exact = [("*", "exact")]
    running = start_in_process(storage, engine=engine)
    try:
        with Checkpointer(running.address, "kept", transport="grpc", retention=policy,
                          policies=exact) as kept, \
                Checkpointer(running.address, "plain", transport="grpc", policies=exact) as plain:
            for step in range(25):
                kept.save(step, state_for(step))
                plain.save(step, state_for(step))
                kept.wait(60)  # one at a time: retention runs between saves
            plain.wait(60)
            _settled(kept, [0, 8, 16, 24])
            # Exact deltas weigh a base each: 1..7 hidden before 8 outweigh a rewrite.
            wait_until(lambda: any(r.getMessage().startswith("retention rewrote")
                                   for r in caplog.records), 30, "a kept delta rewritten")
            if disturb == "restart":
                running.stop()
                running = start_in_process(storage, engine=engine)
            later = range(25, 41)
            with Checkpointer(running.address, "kept", transport="grpc",
                              policies=exact) as kept_again, \
                    Checkpointer(running.address, "plain", transport="grpc",
                                 policies=exact) as plain_again:
                _save_all(kept_again, later)
                _save_all(plain_again, later)
                _settled(kept_again, [0, 8, 16, 24, 32, 40])
                for step in (24, 32, 40):
                    ours = kept_again.restore_info(step)
                    theirs = plain_again.restore_info(step)
                    assert ours.checksum == theirs.checksum, step
                    assert np.array_equal(ours.state["w"], state_for(step)["w"]), step
    finally:
        running.stop()
