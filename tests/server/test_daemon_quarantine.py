"""A damaged manifest never makes a restart delete its step (issue 19).

A real daemon saves chains; the test then deletes, truncates or garbles the manifest of
the latest, a middle and a base step straight on disk and restarts the daemon on the same
directory. Every byte must still exist (moved under ``quarantine/``), each damaged step
must be quarantined, counted in the metrics and named by ``ckptd verify``, and every step
that does not depend on a damaged one must restore to the bytes it held before.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
from pathlib import Path

import daemon_wire as wire
import grpc
import numpy as np
import pytest
from ckptd.daemon.cli.app import main as ckptd
from ckptd.daemon.config import EngineConfig
from ckptd.daemon.domain import StepKey
from ckptd.daemon.store.manifest import manifest_key
from daemon_harness import start_in_process

# One base and deltas on it: the step after a damaged one cannot restore, the one before can.
CHAINED = EngineConfig(base_interval=1000, max_delta_fraction=100.0)
STEPS = (1, 2, 3, 4)
# run -> the step whose manifest is damaged: the latest, a middle one, the base.
DAMAGED = {"latest": 4, "middle": 2, "base": 1}
# Steps that need no damaged step to restore.
RESTORABLE = {("latest", 1), ("latest", 2), ("latest", 3), ("middle", 1)}


def _arrays(step: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(step)
    return {"w": rng.standard_normal((128, 64)).astype(np.float32),
            "step": np.array([step], np.int64)}


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "deleted":
        path.unlink()
    elif how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    else:  # garbled: same length, bytes in the middle flipped (the zstd checksum fails)
        middle = len(data) // 2
        path.write_bytes(data[:middle] + bytes(b ^ 0x5A for b in data[middle:middle + 8])
                         + data[middle + 8:])


def _cli(*args: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = ckptd(list(args), environ={})
    return code, out.getvalue()


@pytest.mark.parametrize("how", ["deleted", "truncated", "garbled"])
def test_a_damaged_manifest_is_quarantined_never_deleted(tmp_path: Path, how: str) -> None:
    storage = tmp_path / "storage"
    restored = _save_all(storage)
    assert not list(storage.rglob("pending"))  # every committed save removed its marker
    blobs_before = sorted(hashlib.sha256(p.read_bytes()).hexdigest()
                          for p in storage.rglob("*.blob"))
    for run, step in DAMAGED.items():
        _damage(storage / manifest_key(StepKey(run, 0, step)), how)

    code, out = _cli("verify", "--storage", str(storage))  # before any restart
    assert code == 1
    for run, step in DAMAGED.items():
        assert f"FAILED {StepKey(run, 0, step)}: damaged" in out, out

    _restart_and_restore(storage, restored)

    # Nothing was deleted: every blob written before still exists, moved or not.
    blobs_after = [hashlib.sha256(p.read_bytes()).hexdigest() for p in storage.rglob("*.blob")]
    assert set(blobs_before) <= set(blobs_after)
    quarantined = {p.parent.name.split("-")[0] for p in (storage / "quarantine").rglob("*.blob")}
    assert quarantined == {f"{step:020d}" for step in DAMAGED.values()}
    _operator_sees_and_clears(storage, how)


def _save_all(storage: Path) -> dict[tuple[str, int], str]:
    """Saves every run through a daemon; returns the checksums of the restorable steps."""
    first = start_in_process(storage, engine=CHAINED)
    restored: dict[tuple[str, int], str] = {}
    try:
        with grpc.insecure_channel(first.address) as channel:
            client = wire.stub(channel)
            for run in DAMAGED:
                for step in STEPS:
                    wire.save_durable(client, run, step, _arrays(step))
            for run, step in RESTORABLE:
                header, arrays = wire.restore(client, run, step)
                restored[(run, step)] = wire.received_checksum(header, arrays)
    finally:
        first.stop()
    return restored


def _restart_and_restore(storage: Path, restored: dict[tuple[str, int], str]) -> None:
    second = start_in_process(storage, engine=CHAINED)
    try:
        registry = second.running.metrics.registry
        assert registry.get_sample_value("ckptd_steps_quarantined_total") == len(DAMAGED)
        assert registry.get_sample_value("ckptd_quarantine_steps") == len(DAMAGED)
        with grpc.insecure_channel(second.address) as channel:
            client = wire.stub(channel)
            for (run, step), checksum in restored.items():
                header, arrays = wire.restore(client, run, step)
                assert wire.received_checksum(header, arrays) == checksum == header.checksum
            steps = {run: [s.step for s in client.ListSteps(
                wire.pb.ListStepsRequest(run=run, rank=0)).steps]
                for run in ("latest", "middle")}
            assert steps["latest"] == [1, 2, 3] and steps["middle"] == [1, 3, 4]
            # The latest step's number is free again: the trainer can save it anew.
            wire.save_durable(client, "latest", 4, _arrays(40))
    finally:
        second.stop()


def _operator_sees_and_clears(storage: Path, how: str) -> None:
    code, out = _cli("ls", "--quarantined", "--storage", str(storage))
    assert code == 0
    reason = "manifest missing" if how == "deleted" else "manifest unreadable"
    for run, step in DAMAGED.items():
        assert any(line.split()[:3] == [run, "0", str(step)] and reason in line
                   for line in out.splitlines()), out
    code, out = _cli("verify", "--storage", str(storage))
    assert code == 1
    for run, step in DAMAGED.items():
        assert f"FAILED {StepKey(run, 0, step)}: quarantined in quarantine/{run}/0/" in out, out
    # Deltas whose parent is quarantined fail too, as corrupt; the rest pass.
    assert f"FAILED {StepKey('middle', 0, 3)}: CorruptCheckpointError" in out
    assert f"FAILED {StepKey('latest', 0, 1)}" not in out

    code, out = _cli("rm", "--quarantined", "--storage", str(storage), "--yes")
    assert code == 0 and "deleted 3 quarantined step directories" in out
    assert not list((storage / "quarantine").rglob("*.blob"))
    code, out = _cli("ls", "--quarantined", "--storage", str(storage))
    assert code == 0 and out == ""
