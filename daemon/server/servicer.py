"""The gRPC ``CheckpointdService``: convert the request, call the engine, convert back.

Every handler is wrapped by ``rpc``: ``maps_errors`` (``ckptd.daemon.server.status``) turns the
engine's errors into rich statuses naming the request's run/rank/step, so handlers raise and
never touch them; before that,
each error is counted in the metrics (method, code, exception class) and logged with the
request's run, rank and step. The only logic here is the streams' framing and pacing. A
save: header first, then chunks (or a shared-memory segment), then commit; any error, a
client hanging up, or a stream that sends nothing for ``stream_idle_timeout_s``
(``StreamIdleError``) before the commit aborts the session, which releases its step and
budget and leaves storage untouched. A restore writes one message at a time and waits for
gRPC's flow control to take each before making the next, so an unread restore holds its
materialized tensors (counted in the engine's restore budget) and at most one chunk in
Python, and is ended when its client reads nothing for ``stream_idle_timeout_s``.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import math
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeAlias, TypeVar

import grpc
from ckptd.daemon.engine.core import Engine, SaveSession
from ckptd.daemon.errors import InvalidRequestError, StreamIdleError
from ckptd.daemon.logs import fields, get_logger, step_fields
from ckptd.daemon.server import convert, shm
from ckptd.daemon.server.metrics import Metrics
from ckptd.daemon.server.status import maps_errors, status_for
from ckptd.protos.v1 import pb, pb_grpc

log = get_logger("servicer")

Context: TypeAlias = grpc.aio.ServicerContext
# Longest single WaitSave; a client that wants longer calls again.
MAX_WAIT_S = 24 * 3600.0
H = TypeVar("H", bound=Callable[..., Any])
# run/rank/step of the request being handled, for its error line; each RPC runs in a task of
# its own, so each sees only its own value. A save sets it once its header is read.
_REQUEST_FIELDS: contextvars.ContextVar[dict[str, object]] = contextvars.ContextVar(
    "ckptd_request_fields"
)


def rpc(handler: H) -> H:
    """Wraps a handler (coroutine or async generator) with the status table and counts
    every error it raises in ``self._metrics`` before the table turns it into a status."""
    method = handler.__name__

    def count(servicer: CheckpointdServicer, exc: Exception) -> None:
        code, message = status_for(exc)
        servicer._metrics.rpc_error(method, code.name, type(exc).__name__)
        log.info("request failed %s", fields(
            **_REQUEST_FIELDS.get({}), method=method, code=code.name, error=type(exc).__name__,
            message=message,
        ))

    if inspect.isasyncgenfunction(handler):

        @functools.wraps(handler)
        async def stream(self: CheckpointdServicer, request: Any, context: Context) -> Any:
            _REQUEST_FIELDS.set(_request_fields(request))
            try:
                async for reply in handler(self, request, context):
                    yield reply
            except Exception as exc:
                count(self, exc)
                raise

        return maps_errors(stream, _subject)  # type: ignore[return-value]

    @functools.wraps(handler)
    async def unary(self: CheckpointdServicer, request: Any, context: Context) -> Any:
        _REQUEST_FIELDS.set(_request_fields(request))
        try:
            return await handler(self, request, context)
        except Exception as exc:
            count(self, exc)
            raise

    return maps_errors(unary, _subject)  # type: ignore[return-value]


def _subject() -> dict[str, object]:
    return _REQUEST_FIELDS.get({})


def _request_fields(request: Any) -> dict[str, object]:
    """The run, rank and step a request message names (a save stream names none)."""
    ref = getattr(request, "ref", request)
    descriptor = getattr(ref, "DESCRIPTOR", None)
    if descriptor is None:
        return {}
    named = {}
    for name in ("run", "rank", "step"):
        field = descriptor.fields_by_name.get(name)
        if field is not None and (not field.has_presence or ref.HasField(name)):
            named[name] = getattr(ref, name)
    return named


class CheckpointdServicer(pb_grpc.CheckpointdServiceServicer):
    """Adapts the ``Engine`` to the ckptd.v1 gRPC API."""

    def __init__(
        self,
        engine: Engine,
        server_info: pb.ServerInfo,
        max_chunk_bytes: int,
        metrics: Metrics,
        *,
        stream_idle_timeout_s: float = 60.0,
    ) -> None:
        self._engine = engine
        self._server_info = server_info
        self._max_chunk_bytes = max_chunk_bytes
        self._metrics = metrics
        self._idle_timeout_s = stream_idle_timeout_s

    @rpc
    async def Save(
        self, request_iterator: AsyncIterator[pb.SaveRequest], context: Context
    ) -> pb.SaveResponse:
        message = await self._next(request_iterator)
        if message is None or message.WhichOneof("item") != "header":
            got = "an empty stream" if message is None else "a chunk"
            raise InvalidRequestError(f"a save stream must start with its header; got {got}")
        header = convert.header_from_proto(message.header)
        key = header.key
        _REQUEST_FIELDS.set({"run": key.run, "rank": key.rank, "step": key.step})
        segment = _segment_ref(message.header)
        if segment is not None:
            shm.check_layout(segment, header.tensors)
        session = await self._engine.open_save(header, identity=_identity(context))
        async with session:
            if segment is None:
                await self._receive_chunks(session, request_iterator)
            else:
                await self._expect_end(request_iterator, segment.name)
                await _copy_off_loop(session, segment)
            status = await session.commit()
        log.info("save accepted %s", step_fields(
            header.key, bytes=header.nbytes, tensors=len(header.tensors),
            transport="shm" if segment else "stream",
        ))
        return pb.SaveResponse(status=convert.status_to_proto(status))

    async def _receive_chunks(
        self, session: SaveSession, request_iterator: AsyncIterator[pb.SaveRequest]
    ) -> None:
        while (message := await self._next(request_iterator)) is not None:
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

    async def _expect_end(
        self, request_iterator: AsyncIterator[pb.SaveRequest], segment: str
    ) -> None:
        if await self._next(request_iterator) is not None:
            raise InvalidRequestError(
                f"a save through shared memory segment {segment!r} carries no chunks; got one"
            )

    async def _next(self, request_iterator: AsyncIterator[pb.SaveRequest]) -> Any:
        """The stream's next message (None at its end); ``StreamIdleError`` when none comes
        within the idle timeout, so a paused or silently vanished client holds nothing."""
        try:
            return await asyncio.wait_for(anext(request_iterator, None), self._idle_timeout_s)
        except asyncio.TimeoutError:
            raise StreamIdleError(
                f"the save stream sent nothing for {self._idle_timeout_s:g} s (the daemon's "
                "stream_idle_timeout_s); it was ended and its reservation released; send the "
                "save again without pausing inside the stream"
            ) from None

    async def _write(self, context: Context, message: pb.RestoreResponse) -> None:
        """Writes one restore message once flow control takes it; ``StreamIdleError`` when
        the client reads nothing for the idle timeout."""
        try:
            await asyncio.wait_for(context.write(message), self._idle_timeout_s)
        except asyncio.TimeoutError:
            raise StreamIdleError(
                f"the restore's client read nothing for {self._idle_timeout_s:g} s (the "
                "daemon's stream_idle_timeout_s); it was ended and its memory released"
            ) from None

    @rpc
    async def WaitSave(
        self, request: pb.WaitSaveRequest, context: Context
    ) -> pb.WaitSaveResponse:
        if math.isnan(request.timeout_s) or request.timeout_s < 0:
            raise InvalidRequestError(f"timeout_s must be >= 0, got {request.timeout_s}")
        key = convert.key_from_ref(request.ref)
        status = await self._engine.wait(key, min(request.timeout_s, MAX_WAIT_S))
        return pb.WaitSaveResponse(status=convert.status_to_proto(status))

    @rpc
    async def Restore(self, request: pb.RestoreRequest, context: Context) -> None:
        started_s = time.monotonic()
        step = request.step if request.HasField("step") else None
        identity = _identity(context)
        async with self._engine.restoring(
            request.run, request.rank, step, identity=identity
        ) as restored:
            await self._write(context, pb.RestoreResponse(
                header=convert.restore_header_to_proto(restored)))
            for chunk in convert.restore_chunks(restored, self._max_chunk_bytes):
                await self._write(context, pb.RestoreResponse(chunk=chunk))
        seconds = time.monotonic() - started_s
        nbytes = sum(array.nbytes for array in restored.arrays)
        self._metrics.restore_done(seconds, nbytes)
        log.info("restore served %s", step_fields(
            restored.key, bytes=nbytes, tensors=len(restored.arrays), seconds=round(seconds, 4)))

    @rpc
    async def ListRuns(
        self, request: pb.ListRunsRequest, context: Context
    ) -> pb.ListRunsResponse:
        runs = self._engine.list_runs()
        return pb.ListRunsResponse(runs=[convert.run_info_to_proto(info) for info in runs])

    @rpc
    async def ListSteps(
        self, request: pb.ListStepsRequest, context: Context
    ) -> pb.ListStepsResponse:
        steps = self._engine.list_steps(request.run, request.rank)
        return pb.ListStepsResponse(steps=[convert.step_info_to_proto(info) for info in steps])

    @rpc
    async def DeleteStep(
        self, request: pb.DeleteStepRequest, context: Context
    ) -> pb.DeleteStepResponse:
        key = convert.key_from_ref(request.ref)
        deleted = await self._engine.delete_step(key)
        log.info("step deleted %s", step_fields(key))
        return pb.DeleteStepResponse(deleted_steps=deleted)

    @rpc
    async def DeleteRun(
        self, request: pb.DeleteRunRequest, context: Context
    ) -> pb.DeleteRunResponse:
        deleted = await self._engine.delete_run(request.run)
        log.info("run deleted %s", fields(run=request.run, steps=deleted))
        return pb.DeleteRunResponse(deleted_steps=deleted)

    @rpc
    async def GetServerInfo(
        self, request: pb.GetServerInfoRequest, context: Context
    ) -> pb.GetServerInfoResponse:
        return pb.GetServerInfoResponse(info=self._server_info)


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


def _identity(context: Context) -> str:
    """Whose share of the budgets a request counts in: the gRPC peer (one per client
    channel; every unix-socket client alike) until authenticated identities exist."""
    return context.peer() or ""
