"""A save encoded while it streams in (``ckptd.daemon.engine.streaming``), cut short by a
crash or by its client: blobs written before the whole checkpoint arrived never become a
step, a restart removes them, and the chain continues from its previous head."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import daemon_wire as wire
import grpc
import numpy as np
import pytest
from ckptd.protos.v1 import pb
from daemon_harness import SpawnDaemon, wait_until

RUN = "streamed"
CHUNK_BYTES = 16 * 1024
_RNG = np.random.default_rng(11)
_A = _RNG.standard_normal(65536).astype(np.float32)
_B = _RNG.standard_normal(65536).astype(np.float32)


def state_for(step: int) -> dict[str, np.ndarray]:
    return {
        "w": _A + np.float32(0.01 * step) * _B,
        "v": _B - np.float32(0.01 * step) * _A,
        "counter": np.array([step], dtype=np.int64),
    }


def _first_tensor_then_hold(step: int, gate: threading.Event) -> Iterator[pb.SaveRequest]:
    """The save's header and its first tensor's chunks, then nothing until ``gate``."""
    state = state_for(step)
    yield pb.SaveRequest(header=wire.header_of(RUN, step, state))
    for request in wire.chunks_of(state, CHUNK_BYTES):
        if request.chunk.tensor_index != 0:
            break
        yield request
    gate.wait(60)


def _step_dir(storage: Path, step: int) -> Path:
    return storage / "runs" / RUN / "0" / f"{step:020d}"


def _check(client: wire.pb_grpc.CheckpointdServiceStub, step: int) -> None:
    _, arrays = wire.restore(client, RUN, step)
    expected = state_for(step)
    assert np.array_equal(arrays["counter"], expected["counter"])
    assert np.abs(arrays["w"] - expected["w"]).max() < 0.1


@pytest.mark.parametrize("cut", [
    pytest.param("daemon killed", marks=pytest.mark.slow),  # two daemon start-ups: ~2.7 s
    "client cancelled",
])
def test_a_save_cut_while_its_tensors_are_written_leaves_no_step(
    tmp_path: Path, spawn_daemon: SpawnDaemon, cut: str
) -> None:
    storage = tmp_path / "storage"
    process = spawn_daemon(storage)
    step_dir = _step_dir(storage, 2)
    gate = threading.Event()
    try:
        with grpc.insecure_channel(process.address) as channel:
            client = wire.stub(channel)
            wire.save_durable(client, RUN, 1, state_for(1))
            call = client.Save.future(_first_tensor_then_hold(2, gate), timeout=60)
            # Tensor 0 is encoded and written while the stream is still open.
            wait_until(lambda: any(step_dir.glob("00000.*blob")),
                       what="tensor 0's blob, written before the save is complete")
            if cut == "daemon killed":
                process.kill()
            else:
                call.cancel()
                wait_until(lambda: not _step_dir(storage, 2).exists(),
                           what="the cancelled save's keys deleted")
            gate.set()
            with pytest.raises((grpc.RpcError, grpc.FutureCancelledError)):
                call.result()
    finally:
        gate.set()
    if cut == "daemon killed":
        process = spawn_daemon(storage)
    with grpc.insecure_channel(process.address) as channel:
        client = wire.stub(channel)
        steps = client.ListSteps(pb.ListStepsRequest(run=RUN), timeout=30).steps
        assert [info.step for info in steps] == [1]
        assert not _step_dir(storage, 2).exists()  # removed at start, or on the abort
        _check(client, 1)
        wire.save_durable(client, RUN, 2, state_for(2))  # the chain goes on from step 1
        _check(client, 2)
    assert process.terminate() == 0
