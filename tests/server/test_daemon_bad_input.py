"""Done-when (3): each bad request gets its status code and a message naming the problem,
and the daemon keeps serving other clients afterwards."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeAlias

import daemon_wire as wire
import grpc
import numpy as np
import pytest
from ckptd.daemon.config import EngineConfig
from ckptd.protos.v1 import pb, pb_grpc
from daemon_harness import InProcessDaemon, start_in_process, wait_until

STATE = {"w": np.arange(4096, dtype=np.float32), "b": np.arange(3, dtype=np.int32)}
Stub: TypeAlias = pb_grpc.CheckpointdServiceStub


def _save(client: Stub, requests: list[pb.SaveRequest]) -> grpc.RpcError:
    return wire.rpc_error(lambda: client.Save(iter(requests), timeout=30))


def unknown_run(client: Stub) -> grpc.RpcError:
    return wire.rpc_error(lambda: wire.restore(client, "never-saved"))


def unknown_step(client: Stub) -> grpc.RpcError:
    wire.save_durable(client, "known", 1, STATE)
    return wire.rpc_error(lambda: wire.restore(client, "known", 99))


def nbytes_mismatch(client: Stub) -> grpc.RpcError:
    header = wire.header_of("r", 1, STATE)
    header.tensors[0].nbytes += 4
    return _save(client, [pb.SaveRequest(header=header)])


def chunk_past_end(client: Stub) -> grpc.RpcError:
    header = wire.header_of("r", 1, {"w": STATE["w"]})
    chunk = pb.TensorChunk(tensor_index=0, offset=0, data=bytes(STATE["w"].nbytes + 4))
    return _save(client, [pb.SaveRequest(header=header), pb.SaveRequest(chunk=chunk)])


def duplicate_step(client: Stub) -> grpc.RpcError:
    wire.save_durable(client, "dup", 3, STATE)
    return wire.rpc_error(lambda: wire.save(client, "dup", 3, STATE))


def backwards_step(client: Stub) -> grpc.RpcError:
    wire.save_durable(client, "back", 5, STATE)
    return wire.rpc_error(lambda: wire.save(client, "back", 4, STATE))


def oversized_chunk(client: Stub) -> grpc.RpcError:
    big = {"w": np.zeros(1 << 19, dtype=np.float32)}  # 2 MiB, sent as one chunk
    return wire.rpc_error(lambda: client.Save(wire.save_requests("r", 1, big, chunk_bytes=2 << 20)))


def oversized_checkpoint(client: Stub) -> grpc.RpcError:
    big = {"w": np.zeros(1 << 20, dtype=np.float32)}  # 4 MiB > the test's 2 MiB limit
    return _save(client, [pb.SaveRequest(header=wire.header_of("r", 1, big))])


def truncated_stream(client: Stub) -> grpc.RpcError:
    requests = list(wire.save_requests("r", 1, STATE, chunk_bytes=4096))
    return _save(client, requests[:2])  # header and the first 4096 of 16384 bytes of 'w'


def dotted_run(client: Stub) -> grpc.RpcError:
    return wire.rpc_error(lambda: wire.save(client, "../x", 1, STATE))


def empty_run(client: Stub) -> grpc.RpcError:
    return wire.rpc_error(lambda: wire.save(client, "", 1, STATE))


def absurd_shape(client: Stub) -> grpc.RpcError:
    spec = pb.TensorSpec(name="huge", dtype=pb.DTYPE_FLOAT32, shape=[1 << 20, 1 << 20],
                         nbytes=4 << 40)
    return _save(client, [pb.SaveRequest(header=pb.SaveHeader(run="r", step=1, tensors=[spec]))])


def missing_header(client: Stub) -> grpc.RpcError:
    return _save(client, list(wire.chunks_of(STATE)))


def second_header(client: Stub) -> grpc.RpcError:
    header = wire.header_of("r", 1, STATE)
    return _save(client, [pb.SaveRequest(header=header), pb.SaveRequest(header=header)])


def unknown_tensor(client: Stub) -> grpc.RpcError:
    chunk = pb.TensorChunk(tensor_index=7, offset=0, data=b"\0" * 16)
    requests = [pb.SaveRequest(header=wire.header_of("r", 1, STATE)), pb.SaveRequest(chunk=chunk)]
    return _save(client, requests)


def unknown_dtype(client: Stub) -> grpc.RpcError:
    header = wire.header_of("r", 1, STATE)
    header.tensors[1].dtype = 99
    return _save(client, [pb.SaveRequest(header=header)])


INVALID = grpc.StatusCode.INVALID_ARGUMENT
CASES: list[tuple[Callable[[Stub], grpc.RpcError], grpc.StatusCode, list[str]]] = [
    (unknown_run, grpc.StatusCode.NOT_FOUND, ["'never-saved'"]),
    (unknown_step, grpc.StatusCode.NOT_FOUND, ["known", "99"]),
    (nbytes_mismatch, INVALID, ["'w'", "nbytes 16388", "16384"]),
    (chunk_past_end, INVALID, ["'w'", "past the end", "16384"]),
    (duplicate_step, grpc.StatusCode.ALREADY_EXISTS, ["dup", "step3", "already saved"]),
    (backwards_step, grpc.StatusCode.FAILED_PRECONDITION, ["back", "4", "5"]),
    (oversized_chunk, INVALID, ["2097152 bytes", "max_chunk_bytes 1048576"]),
    (oversized_checkpoint, INVALID, ["4194304 bytes", "max_checkpoint_bytes"]),
    (truncated_stream, INVALID, ["'w'", "4096 of 16384"]),
    (dotted_run, INVALID, ["'../x'"]),
    (empty_run, INVALID, ["invalid run name ''"]),
    (absurd_shape, INVALID, ["4398046511104 bytes", "max_checkpoint_bytes"]),
    (missing_header, INVALID, ["must start with its header"]),
    (unknown_dtype, INVALID, ["'b'", "unknown dtype value 99"]),
    (second_header, INVALID, ["exactly one header"]),
    (unknown_tensor, INVALID, ["tensor index 7", "2 tensors"]),
]


@pytest.fixture
def small_daemon(tmp_path: Path) -> Iterator[InProcessDaemon]:
    engine = EngineConfig(max_checkpoint_bytes=2 << 20, max_inflight_bytes=64 << 20)
    running = start_in_process(tmp_path / "storage", engine=engine)
    try:
        yield running
    finally:
        running.stop()


def _still_serves(daemon: InProcessDaemon) -> None:
    wait_until(lambda: daemon.call(lambda engine: engine.inflight_bytes) == 0, what="budget")
    with grpc.insecure_channel(daemon.address) as channel:
        client = wire.stub(channel)
        wire.save_durable(client, "healthy", 1, STATE)
        header, arrays = wire.restore(client, "healthy", 1)
    assert wire.received_checksum(header, arrays) == header.checksum


@pytest.mark.parametrize(("case", "code", "needles"), CASES, ids=[c[0].__name__ for c in CASES])
def test_bad_input(
    small_daemon: InProcessDaemon,
    case: Callable[[Stub], grpc.RpcError],
    code: grpc.StatusCode,
    needles: list[str],
) -> None:
    with grpc.insecure_channel(small_daemon.address) as channel:
        error = case(wire.stub(channel))
    assert error.code() is code, error.details()
    for needle in needles:
        assert needle in error.details()
    _still_serves(small_daemon)


def test_client_cancel_mid_stream_releases_everything(small_daemon: InProcessDaemon) -> None:
    sent_first_chunk = threading.Event()
    never = threading.Event()

    def stalled() -> Iterator[pb.SaveRequest]:
        requests = wire.save_requests("cancel", 1, STATE, chunk_bytes=4096)
        yield next(requests)
        yield next(requests)
        sent_first_chunk.set()
        never.wait(30)

    with grpc.insecure_channel(small_daemon.address) as channel:
        client = wire.stub(channel)
        call = client.Save.future(stalled(), timeout=60)
        assert sent_first_chunk.wait(30)
        wait_until(lambda: small_daemon.call(lambda e: e.inflight_bytes) > 0, what="session")
        call.cancel()
        never.set()
        assert call.cancelled()
        wait_until(lambda: small_daemon.call(lambda e: e.inflight_bytes) == 0, what="release")
        # Nothing durable changed, and the step is free again.
        assert not list((small_daemon.storage_path / "runs" / "cancel").rglob("manifest.json"))
        wire.save_durable(client, "cancel", 1, STATE)
    _still_serves(small_daemon)


def test_full_budget_with_fail_if_busy_is_resource_exhausted(tmp_path: Path) -> None:
    running = start_in_process(tmp_path / "storage", engine=EngineConfig(max_inflight_bytes=20000))
    release = threading.Event()

    def held() -> Iterator[pb.SaveRequest]:
        requests = wire.save_requests("hold", 1, STATE, chunk_bytes=4096)
        yield next(requests)
        release.wait(60)
        yield from requests

    try:
        with grpc.insecure_channel(running.address) as channel:
            client = wire.stub(channel)
            pending = client.Save.future(held(), timeout=60)
            wait_until(lambda: running.call(lambda e: e.inflight_bytes) > 0, what="session")
            header = wire.header_of("other", 1, STATE, fail_if_busy=True)
            requests = [pb.SaveRequest(header=header), *wire.chunks_of(STATE)]
            error = wire.rpc_error(lambda: client.Save(iter(requests), timeout=30))
            assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "20000" in error.details()
            release.set()
            assert pending.result().status.state == pb.SAVE_STATE_ACCEPTED
        _still_serves(running)
    finally:
        release.set()
        running.stop()
