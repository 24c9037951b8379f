"""Done-when (2): SIGKILL at random moments during a stream of saves loses nothing that was
reported durable, lists nothing uncommitted, and the chain continues after each restart."""

from __future__ import annotations

import random
import threading
from pathlib import Path
from typing import TypeAlias

import daemon_wire as wire
import grpc
import numpy as np
import pytest
from ckptd.daemon.store.manifest import MANIFEST_NAME
from ckptd.protos.v1 import pb, pb_grpc
from daemon_harness import SpawnDaemon

Stub: TypeAlias = pb_grpc.CheckpointdServiceStub

TRIALS = 20
RUN = "crashy"
_RNG = np.random.default_rng(7)
_A = _RNG.standard_normal(32768).astype(np.float32)
_B = _RNG.standard_normal(32768).astype(np.float32)


def state_for(step: int) -> dict[str, np.ndarray]:
    """A deterministic state per step, so that any restored step can be checked later."""
    return {
        "w": _A + np.float32(0.01 * step) * _B,
        "small": np.full(64, step, dtype=np.float32),
        "counter": np.array([step], dtype=np.int64),
    }


def _listed_steps(client: Stub) -> list[int]:
    try:
        steps = client.ListSteps(pb.ListStepsRequest(run=RUN), timeout=30).steps
    except grpc.RpcError as exc:
        if exc.code() is grpc.StatusCode.NOT_FOUND:
            return []
        raise
    return [info.step for info in steps]


def _verify(client: Stub, storage: Path, steps: list[int]) -> None:
    for step in steps:
        header, arrays = wire.restore(client, RUN, step)
        assert header.checksum == wire.manifest_checksum(storage, RUN, 0, step), step
        assert wire.received_checksum(header, arrays) == header.checksum, step
        expected = state_for(step)
        assert np.array_equal(arrays["counter"], expected["counter"]), step
        assert np.array_equal(arrays["small"], expected["small"]), step
        error = np.abs(arrays["w"] - expected["w"]).max()
        assert error < 0.1, (step, error)


def _committed_on_disk(storage: Path) -> set[int]:
    manifests = (storage / "runs" / RUN).glob(f"*/*/{MANIFEST_NAME}")
    return {int(path.parent.name) for path in manifests}


def _save_until_killed(client: Stub, first_step: int, durable: set[int]) -> None:
    """Saves steps in order until the daemon dies, waiting for each step's durability only
    after the next one is accepted, so that kills also land while saves are in the pipeline."""
    step = first_step
    try:
        while True:
            accepted = wire.save(client, RUN, step, state_for(step))
            assert accepted.state == pb.SAVE_STATE_ACCEPTED
            if step > first_step:
                status = wire.wait(client, RUN, step - 1, timeout_s=30)
                assert status.state == pb.SAVE_STATE_DURABLE, status
                durable.add(step - 1)
            step += 1
    except grpc.RpcError as exc:
        assert exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED), exc


@pytest.mark.slow
def test_sigkill_during_saves_keeps_every_durable_step(
    tmp_path: Path, spawn_daemon: SpawnDaemon
) -> None:
    storage = tmp_path / "storage"
    chooser = random.Random(20240601)
    durable: set[int] = set()
    verified = 0
    for _ in range(TRIALS):
        process = spawn_daemon(storage, "--base-interval", "8")
        with grpc.insecure_channel(process.address) as channel:
            client = wire.stub(channel)
            listed = _listed_steps(client)
            assert durable <= set(listed), sorted(durable - set(listed))
            assert set(listed) == _committed_on_disk(storage)
            _verify(client, storage, [s for s in listed if s > verified])
            verified = max(listed, default=0)
            killer = threading.Timer(chooser.uniform(0.0, 0.8), process.kill)
            killer.start()
            _save_until_killed(client, verified + 1, durable)
            killer.join()
    print(f"durable steps: {len(durable)}, last: {max(durable, default=0)}")
    assert len(durable) >= TRIALS  # most trials made progress: the test saw real saves
    process = spawn_daemon(storage, "--base-interval", "8")
    with grpc.insecure_channel(process.address) as channel:
        client = wire.stub(channel)
        listed = _listed_steps(client)
        assert durable <= set(listed)
        _verify(client, storage, listed)
        wire.save_durable(client, RUN, listed[-1] + 1, state_for(listed[-1] + 1))
        _verify(client, storage, [listed[-1] + 1])
    assert process.terminate() == 0
