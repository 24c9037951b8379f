"""Done-when (1): a real model's checkpoints restore bit for bit as the daemon reconstructed
them, before and after a restart on the same storage; plus shared-memory saves."""

from __future__ import annotations

from multiprocessing import shared_memory
from pathlib import Path

import daemon_wire as wire
import grpc
import numpy as np
import pytest
import torch
from ckptd.daemon.config import EngineConfig
from ckptd.protos.status import reason_of
from ckptd.protos.v1 import pb
from daemon_harness import InProcessDaemon, start_in_process
from sklearn.datasets import load_digits

STEPS = 30
RUN = "digits-cnn"


def _model_states(steps: int) -> list[dict[str, np.ndarray]]:
    """Trains a small CNN with Adam on the digits set; one flattened state per step."""
    torch.manual_seed(0)
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(16 * 8 * 8, 10),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    states = []
    for step in range(steps):
        batch = slice(64 * step % 1700, 64 * step % 1700 + 64)
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(images[batch]), labels[batch])
        loss.backward()
        optimizer.step()
        states.append(_flatten(model, optimizer))
    return states


def _flatten(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, np.ndarray]:
    flat = {f"model.{name}": t.detach().numpy().copy() for name, t in model.state_dict().items()}
    for index, slots in optimizer.state_dict()["state"].items():
        for slot, value in slots.items():
            flat[f"optim.{index}.{slot}"] = value.detach().numpy().copy()
    return flat


def _restore_all(address: str, storage: Path) -> dict[int, str]:
    checksums = {}
    with grpc.insecure_channel(address) as channel:
        client = wire.stub(channel)
        for step in range(1, STEPS + 1):
            header, arrays = wire.restore(client, RUN, step)
            assert header.ref.step == step
            assert header.checksum == wire.manifest_checksum(storage, RUN, 0, step)
            assert wire.received_checksum(header, arrays) == header.checksum
            checksums[step] = header.checksum
        latest, _ = wire.restore(client, RUN)
        assert latest.ref.step == STEPS
    return checksums


@pytest.mark.slow
def test_model_checkpoints_restore_bit_for_bit_across_restart(tmp_path: Path) -> None:
    states = _model_states(STEPS)
    storage = tmp_path / "storage"
    first = start_in_process(storage)
    try:
        with grpc.insecure_channel(first.address) as channel:
            client = wire.stub(channel)
            for step, state in enumerate(states, start=1):
                assert wire.save(client, RUN, step, state).state == pb.SAVE_STATE_ACCEPTED
            for step in range(1, STEPS + 1):
                assert wire.wait(client, RUN, step).state == pb.SAVE_STATE_DURABLE
            _, restored = wire.restore(client, RUN, 7)
        for name, saved in states[6].items():
            assert restored[name].dtype == saved.dtype and restored[name].shape == saved.shape
            if saved.size < EngineConfig().min_lossy_elements:  # stored exactly
                assert np.array_equal(restored[name], saved), name
            else:
                error = np.linalg.norm(restored[name] - saved) / (np.linalg.norm(saved) + 1e-12)
                assert error < 0.5, (name, error)
        before = _restore_all(first.address, storage)
    finally:
        first.stop()
    second = start_in_process(storage)
    try:
        assert _restore_all(second.address, storage) == before
    finally:
        second.stop()


def _put_in_segment(arrays: dict[str, np.ndarray]) -> tuple[shared_memory.SharedMemory, list[int]]:
    offsets, cursor = [], 0
    for array in arrays.values():
        offsets.append(cursor)
        cursor += (array.nbytes + 63) // 64 * 64
    segment = shared_memory.SharedMemory(create=True, size=max(cursor, 1))
    buffer = segment.buf
    assert buffer is not None
    for offset, array in zip(offsets, arrays.values(), strict=True):
        buffer[offset : offset + array.nbytes] = array.reshape(-1).view(np.uint8).tobytes()
    return segment, offsets


def _shm_header(
    run: str, arrays: dict[str, np.ndarray], name: str, size: int, offsets: list[int]
) -> pb.SaveRequest:
    ref = pb.SharedMemoryRef(segment_name=name, segment_bytes=size, offsets=offsets)
    return pb.SaveRequest(header=wire.header_of(run, 1, arrays, shared_memory=ref))


STATE: dict[str, np.ndarray] = {
    "w": np.linspace(-1, 1, 5000, dtype=np.float32),
    "n": np.arange(7, dtype=np.int64),
}


def test_shared_memory_save_round_trips(unix_daemon: InProcessDaemon) -> None:
    segment, offsets = _put_in_segment(STATE)
    try:
        request = _shm_header("shm", STATE, segment.name, segment.size, offsets)
        with grpc.insecure_channel(unix_daemon.address) as channel:
            client = wire.stub(channel)
            assert client.Save(iter([request]), timeout=30).status.state == pb.SAVE_STATE_ACCEPTED
            buffer = segment.buf
            assert buffer is not None
            buffer[:] = b"\xff" * segment.size  # the client may reuse it once accepted
            assert wire.wait(client, "shm", 1).state == pb.SAVE_STATE_DURABLE
            _, arrays = wire.restore(client, "shm", 1)
    finally:
        segment.close()
        segment.unlink()
    assert np.array_equal(arrays["n"], STATE["n"])
    assert np.array_equal(arrays["w"], STATE["w"])  # a base is lossless


@pytest.mark.parametrize("problem", ["missing", "chunks", "past_end"])
def test_bad_shared_memory_saves_are_invalid(unix_daemon: InProcessDaemon, problem: str) -> None:
    segment, offsets = _put_in_segment(STATE)
    try:
        name, size = segment.name, segment.size
        requests = [_shm_header("shm", STATE, name, size, offsets)]
        if problem == "missing":
            requests = [_shm_header("shm", STATE, "ckptd-no-such-segment", size, offsets)]
            needle = "'ckptd-no-such-segment' does not exist"
        elif problem == "chunks":
            requests += list(wire.chunks_of(STATE))[:1]
            needle = "carries no chunks"
        else:
            requests = [_shm_header("shm", STATE, name, size, [offsets[0], size - 8])]
            needle = "ends past the end of shared memory segment"
        with grpc.insecure_channel(unix_daemon.address) as channel:
            client = wire.stub(channel)
            error = wire.rpc_error(lambda: client.Save(iter(requests), timeout=30))
            # A missing segment is a refusal (the client streams instead), not a bad request.
            refused = problem == "missing"
            assert error.code() is (grpc.StatusCode.FAILED_PRECONDITION if refused
                                    else grpc.StatusCode.INVALID_ARGUMENT)
            assert reason_of(error).reason == ("ERROR_REASON_SHARED_MEMORY_REFUSED" if refused
                                               else "ERROR_REASON_INVALID_REQUEST")
            assert needle in error.details()
            assert unix_daemon.call(lambda engine: engine.inflight_bytes) == 0
            wire.save_durable(client, "after", 1, STATE)
    finally:
        segment.close()
        segment.unlink()
