"""Raw ckptd.v1 gRPC calls for the daemon's tests (the real client lives in ``ckptd.client``).

Tests here talk to the daemon through the generated stub only, so that they pin the wire
contract itself: header first, chunks in table order, restore header then chunks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from ckptd.daemon.domain import StepKey, TensorSpec
from ckptd.daemon.store.manifest import Manifest, manifest_key, tensors_checksum
from ckptd.protos import dtypes
from ckptd.protos.v1 import pb, pb_grpc

CHUNK_BYTES = 256 * 1024
_WIRE_BY_NUMPY = {np.dtype(row.numpy): row.wire for row in dtypes.BY_NAME.values()
                  if row.name not in ("bfloat16",)}

Arrays = Mapping[str, np.ndarray]
# Call metadata, e.g. the bearer token of the auth tests.
Metadata = tuple[tuple[str, str], ...]


def stub(channel: grpc.Channel) -> pb_grpc.CheckpointdServiceStub:
    return pb_grpc.CheckpointdServiceStub(channel)


def spec_of(name: str, array: np.ndarray) -> pb.TensorSpec:
    return pb.TensorSpec(
        name=name, dtype=_WIRE_BY_NUMPY[array.dtype], shape=array.shape, nbytes=array.nbytes
    )


def header_of(
    run: str, step: int, arrays: Arrays, rank: int = 0, **fields: Any
) -> pb.SaveHeader:
    specs = [spec_of(name, array) for name, array in arrays.items()]
    return pb.SaveHeader(run=run, rank=rank, step=step, tensors=specs, **fields)


def chunks_of(arrays: Arrays, chunk_bytes: int = CHUNK_BYTES) -> Iterator[pb.SaveRequest]:
    for index, array in enumerate(arrays.values()):
        raw = np.ascontiguousarray(array).reshape(-1).view(np.uint8).tobytes()
        for offset in range(0, len(raw), chunk_bytes):
            chunk = pb.TensorChunk(
                tensor_index=index, offset=offset, data=raw[offset : offset + chunk_bytes]
            )
            yield pb.SaveRequest(chunk=chunk)


def save_requests(
    run: str, step: int, arrays: Arrays, rank: int = 0, chunk_bytes: int = CHUNK_BYTES
) -> Iterator[pb.SaveRequest]:
    yield pb.SaveRequest(header=header_of(run, step, arrays, rank))
    yield from chunks_of(arrays, chunk_bytes)


def save(
    client: pb_grpc.CheckpointdServiceStub, run: str, step: int, arrays: Arrays, *, rank: int = 0,
    timeout_s: float = 60.0, metadata: Metadata = (),
) -> pb.SaveStatus:
    requests = save_requests(run, step, arrays, rank)
    status: pb.SaveStatus = client.Save(requests, timeout=timeout_s, metadata=metadata).status
    return status


def wait(
    client: pb_grpc.CheckpointdServiceStub, run: str, step: int, rank: int = 0,
    timeout_s: float = 60.0, *, metadata: Metadata = (),
) -> pb.SaveStatus:
    request = pb.WaitSaveRequest(ref=pb.StepRef(run=run, rank=rank, step=step), timeout_s=timeout_s)
    status: pb.SaveStatus = client.WaitSave(request, timeout=timeout_s + 30,
                                            metadata=metadata).status
    return status


def save_durable(
    client: pb_grpc.CheckpointdServiceStub, run: str, step: int, arrays: Arrays, *, rank: int = 0,
    metadata: Metadata = (),
) -> None:
    accepted = save(client, run, step, arrays, rank=rank, metadata=metadata)
    assert accepted.state == pb.SAVE_STATE_ACCEPTED, accepted
    done = wait(client, run, step, rank, metadata=metadata)
    assert done.state == pb.SAVE_STATE_DURABLE, done


def restore(
    client: pb_grpc.CheckpointdServiceStub, run: str, step: int | None = None, rank: int = 0,
    metadata: Metadata = (),
) -> tuple[pb.RestoreHeader, dict[str, np.ndarray]]:
    """Restores one step and reassembles its arrays, checking the chunk framing."""
    request = pb.RestoreRequest(run=run, rank=rank)
    if step is not None:
        request.step = step
    replies: Iterable[pb.RestoreResponse] = client.Restore(request, timeout=120,
                                                            metadata=metadata)
    header: pb.RestoreHeader | None = None
    buffers: list[bytearray] = []
    for reply in replies:
        if reply.WhichOneof("item") == "header":
            assert header is None, "second restore header"
            header = reply.header
            buffers = [bytearray() for _ in header.tensors]
        else:
            assert header is not None, "chunk before the restore header"
            chunk = reply.chunk
            assert chunk.offset == len(buffers[chunk.tensor_index]), "restore chunk out of order"
            buffers[chunk.tensor_index] += chunk.data
    assert header is not None, "restore stream without a header"
    arrays = {}
    for spec, buffer in zip(header.tensors, buffers, strict=True):
        assert len(buffer) == spec.nbytes, f"tensor {spec.name}: {len(buffer)} of {spec.nbytes}"
        holder = dtypes.from_wire(spec.dtype).numpy
        arrays[spec.name] = np.frombuffer(bytes(buffer), dtype=holder).reshape(tuple(spec.shape))
    return header, arrays


def received_checksum(header: pb.RestoreHeader, arrays: Mapping[str, np.ndarray]) -> str:
    """The checksum of what a restore returned, by the daemon's one definition."""
    specs = [
        TensorSpec(spec.name, dtypes.from_wire(spec.dtype).name, tuple(spec.shape))
        for spec in header.tensors
    ]
    return tensors_checksum(specs, [arrays[spec.name] for spec in specs])


def manifest_checksum(storage_path: Path, run: str, rank: int, step: int) -> str:
    """The checksum committed in the step's manifest, read straight from local storage."""
    path = storage_path / manifest_key(StepKey(run, rank, step))
    return Manifest.from_bytes(path.read_bytes(), str(path)).checksum


def rpc_error(call: Callable[[], object]) -> grpc.RpcError:
    """Runs ``call()`` and returns the ``grpc.RpcError`` it must raise."""
    try:
        call()
    except grpc.RpcError as exc:
        return exc
    raise AssertionError("the call succeeded; expected an RPC error")
