"""The gRPC ``Checkpointd`` service: convert the request, call the engine, convert back.

Every handler is wrapped by ``maps_errors`` (``ckptd.daemon.status``), so handlers raise
the engine's errors and never touch status codes. The only logic here is the save stream's
framing: header first, then chunks (or a shared-memory segment), then commit; any error or
a client hanging up before the commit aborts the session, which releases its budget and
leaves storage untouched.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from typing import TypeAlias

import grpc
from ckptd.daemon import convert, shm
from ckptd.daemon.engine import Engine, SaveSession
from ckptd.daemon.errors import InvalidRequestError
from ckptd.daemon.logs import fields, get_logger
from ckptd.daemon.status import maps_errors
from ckptd.protos.v1 import pb, pb_grpc

log = get_logger("servicer")

Context: TypeAlias = grpc.aio.ServicerContext
# Longest single WaitSave; a client that wants longer calls again.
MAX_WAIT_S = 24 * 3600.0


class CheckpointdServicer(pb_grpc.CheckpointdServicer):
    """Adapts the ``Engine`` to the ckptd.v1 gRPC API."""

    def __init__(self, engine: Engine, server_info: pb.ServerInfo, max_chunk_bytes: int) -> None:
        self._engine = engine
        self._server_info = server_info
        self._max_chunk_bytes = max_chunk_bytes

    @maps_errors
    async def Save(
        self, request_iterator: AsyncIterator[pb.SaveRequest], context: Context
    ) -> pb.SaveStatus:
        message = await anext(request_iterator, None)
        if message is None or message.WhichOneof("item") != "header":
            got = "an empty stream" if message is None else "a chunk"
            raise InvalidRequestError(f"a save stream must start with its header; got {got}")
        header = convert.header_from_proto(message.header)
        segment = _segment_ref(message.header)
        if segment is not None:
            shm.check_layout(segment, header.tensors)
        session = await self._engine.open_save(header)
        async with session:
            if segment is None:
                await self._receive_chunks(session, request_iterator)
            else:
                await _expect_end(request_iterator, segment.name)
                await _copy_off_loop(session, segment)
            status = await session.commit()
        log.info(
            "save accepted %s",
            fields(
                run=header.key.run, rank=header.key.rank, step=header.key.step,
                bytes=header.nbytes, tensors=len(header.tensors),
                transport="shm" if segment else "stream",
            ),
        )
        return convert.status_to_proto(status)

    async def _receive_chunks(
        self, session: SaveSession, request_iterator: AsyncIterator[pb.SaveRequest]
    ) -> None:
        async for message in request_iterator:
            if message.WhichOneof("item") != "chunk":
                raise InvalidRequestError("a save stream carries exactly one header; got a second")
            chunk = message.chunk
            if len(chunk.data) > self._max_chunk_bytes:
                raise InvalidRequestError(
                    f"chunk of tensor {chunk.tensor_index} at offset {chunk.offset} holds "
                    f"{len(chunk.data)} bytes, over the daemon's max_chunk_bytes "
                    f"{self._max_chunk_bytes}; send smaller chunks"
                )
            session.write(chunk.tensor_index, chunk.offset, chunk.data)

    @maps_errors
    async def GetSaveStatus(self, request: pb.StepRef, context: Context) -> pb.SaveStatus:
        return convert.status_to_proto(self._engine.status(convert.key_from_ref(request)))

    @maps_errors
    async def WaitSave(self, request: pb.WaitSaveRequest, context: Context) -> pb.SaveStatus:
        if math.isnan(request.timeout_s) or request.timeout_s < 0:
            raise InvalidRequestError(f"timeout_s must be >= 0, got {request.timeout_s}")
        key = convert.key_from_ref(request.ref)
        status = await self._engine.wait(key, min(request.timeout_s, MAX_WAIT_S))
        return convert.status_to_proto(status)

    @maps_errors
    async def Restore(
        self, request: pb.RestoreRequest, context: Context
    ) -> AsyncIterator[pb.RestoreReply]:
        step = request.step if request.HasField("step") else None
        restored = await self._engine.restore(request.run, request.rank, step)
        log.debug(
            "restore serving %s",
            fields(run=restored.key.run, rank=restored.key.rank, step=restored.key.step),
        )
        yield pb.RestoreReply(header=convert.restore_header_to_proto(restored))
        for chunk in convert.restore_chunks(restored, self._max_chunk_bytes):
            yield pb.RestoreReply(chunk=chunk)

    @maps_errors
    async def ListRuns(self, request: pb.ListRunsRequest, context: Context) -> pb.ListRunsReply:
        runs = self._engine.list_runs()
        return pb.ListRunsReply(runs=[convert.run_info_to_proto(info) for info in runs])

    @maps_errors
    async def ListSteps(self, request: pb.ListStepsRequest, context: Context) -> pb.ListStepsReply:
        steps = self._engine.list_steps(request.run, request.rank)
        return pb.ListStepsReply(steps=[convert.step_info_to_proto(info) for info in steps])

    @maps_errors
    async def DeleteStep(self, request: pb.DeleteStepRequest, context: Context) -> pb.DeleteReply:
        key = convert.key_from_ref(request.ref)
        deleted = await self._engine.delete_step(key)
        log.info("step deleted %s", fields(run=key.run, rank=key.rank, step=key.step))
        return pb.DeleteReply(deleted_steps=deleted)

    @maps_errors
    async def DeleteRun(self, request: pb.DeleteRunRequest, context: Context) -> pb.DeleteReply:
        deleted = await self._engine.delete_run(request.run)
        log.info("run deleted %s", fields(run=request.run, steps=deleted))
        return pb.DeleteReply(deleted_steps=deleted)

    @maps_errors
    async def GetServerInfo(self, request: pb.ServerInfoRequest, context: Context) -> pb.ServerInfo:
        return self._server_info


def _segment_ref(header: pb.SaveHeader) -> shm.SegmentRef | None:
    if not header.HasField("shared_memory"):
        return None
    ref = header.shared_memory
    return shm.SegmentRef(ref.segment_name, ref.segment_bytes, tuple(ref.offsets))


async def _copy_off_loop(session: SaveSession, segment: shm.SegmentRef) -> None:
    """Runs the blocking copy in a thread; if the RPC is cancelled meanwhile, waits for the
    copy to stop touching the session before the cancellation aborts it."""
    copy = asyncio.ensure_future(asyncio.to_thread(shm.copy_into, session, segment))
    try:
        await asyncio.shield(copy)
    except asyncio.CancelledError:
        await asyncio.wait([copy])
        copy.exception()  # retrieved: the cancellation is what this RPC reports
        raise


async def _expect_end(request_iterator: AsyncIterator[pb.SaveRequest], segment: str) -> None:
    async for _ in request_iterator:
        raise InvalidRequestError(
            f"a save through shared memory segment {segment!r} carries no chunks; got one"
        )
