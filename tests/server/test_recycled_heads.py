"""The real daemon reusing a replaced head's memory for the next deltas' reconstructions
(``ckptd.daemon.engine.recycle``): a restore streaming the old head while later saves
encode gets the old head's bytes, and a save cut short by its client leaves the chain, and
every step restored after a restart, as they were."""

from __future__ import annotations

from pathlib import Path

import daemon_wire as wire
import grpc
import numpy as np
import pytest
from ckptd.protos.v1 import pb
from daemon_harness import InProcessDaemon, start_in_process

RUN = "recycled"
_RNG = np.random.default_rng(5)
_A = _RNG.standard_normal(1 << 20).astype(np.float32)  # 4 MiB: more than gRPC buffers
_B = _RNG.standard_normal(1 << 20).astype(np.float32)


def state_for(step: int) -> dict[str, np.ndarray]:
    return {
        "w": _A + np.float32(0.01 * step) * _B,
        "v": _B - np.float32(0.01 * step) * _A,
        "counter": np.array([step], dtype=np.int64),
    }


def _restored_matches_manifest(client: wire.pb_grpc.CheckpointdServiceStub, storage: Path,
                               step: int) -> None:
    header, arrays = wire.restore(client, RUN, step)
    assert wire.received_checksum(header, arrays) == wire.manifest_checksum(
        storage, RUN, 0, step)


def _every_step_after_a_restart(storage: Path, steps: int) -> None:
    restarted = start_in_process(storage)
    try:
        with grpc.insecure_channel(restarted.address) as channel:
            client = wire.stub(channel)
            for step in range(1, steps + 1):
                _restored_matches_manifest(client, storage, step)
    finally:
        restarted.stop()


def _recycled_bytes(daemon: InProcessDaemon) -> int:
    return int(daemon.call(lambda engine: engine._outputs.recycled_bytes))


@pytest.mark.slow  # ~2 s: six saves of 8 MiB and two restarts
def test_a_restore_of_the_old_head_streams_its_bytes_while_later_saves_reuse_memory(
    tmp_path: Path,
) -> None:
    storage = tmp_path / "storage"
    daemon = start_in_process(storage)
    try:
        with grpc.insecure_channel(daemon.address) as channel:
            client = wire.stub(channel)
            for step in (1, 2, 3):
                wire.save_durable(client, RUN, step, state_for(step))
            # Step 3 is the head; its restore is read one message, then held open.
            replies = client.Restore(pb.RestoreRequest(run=RUN, rank=0, step=3), timeout=120)
            first = next(replies)
            assert first.WhichOneof("item") == "header"
            recycled = _recycled_bytes(daemon)
            for step in (4, 5, 6):  # each replaces the head; step 3's memory is still read
                wire.save_durable(client, RUN, step, state_for(step))
            assert _recycled_bytes(daemon) > recycled  # steps 4..6 reused other heads
            buffers = [bytearray() for _ in first.header.tensors]
            for reply in replies:
                buffers[reply.chunk.tensor_index] += reply.chunk.data
            arrays = {spec.name: np.frombuffer(bytes(buffer), np.float32 if spec.name != "counter"
                                               else np.int64)
                      for spec, buffer in zip(first.header.tensors, buffers, strict=True)}
            assert wire.received_checksum(first.header, arrays) == wire.manifest_checksum(
                storage, RUN, 0, 3)
    finally:
        daemon.stop()
    _every_step_after_a_restart(storage, 6)


@pytest.mark.parametrize("stream_saves", ["always", "never"])
def test_a_save_cut_by_its_client_leaves_every_step_as_committed(
    tmp_path: Path, stream_saves: str
) -> None:
    """Step 4 is cut after its first tensor (encoded at once when streamed, into reused
    memory); the chain goes on from step 3, and steps restore the same after a restart."""
    from ckptd.daemon.config import EngineConfig

    storage = tmp_path / "storage"
    daemon = start_in_process(storage, engine=EngineConfig(stream_saves=stream_saves))
    try:
        with grpc.insecure_channel(daemon.address) as channel:
            client = wire.stub(channel)
            for step in (1, 2, 3):
                wire.save_durable(client, RUN, step, state_for(step))
            requests = list(wire.save_requests(RUN, 4, state_for(4)))
            first_tensor = [r for r in requests if r.WhichOneof("item") == "header"
                            or r.chunk.tensor_index == 0]
            with pytest.raises(grpc.RpcError) as cut:
                client.Save(iter(first_tensor), timeout=60)  # ends early: incomplete
            assert cut.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert [i.step for i in client.ListSteps(pb.ListStepsRequest(run=RUN),
                                                     timeout=30).steps] == [1, 2, 3]
            _restored_matches_manifest(client, storage, 3)
            for step in (4, 5):
                wire.save_durable(client, RUN, step, state_for(step))
            assert _recycled_bytes(daemon) > 0
    finally:
        daemon.stop()
    _every_step_after_a_restart(storage, 5)
