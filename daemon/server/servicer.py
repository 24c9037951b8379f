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
import contextlib
import contextvars
import functools
import inspect
import math
import os
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeAlias, TypeVar

import grpc
from ckptd.daemon.domain import RestoredCheckpoint, StreamedCheckpoint
from ckptd.daemon.engine.core import Engine
from ckptd.daemon.errors import InvalidRequestError, StreamIdleError
from ckptd.daemon.logs import fields, get_logger, step_fields
from ckptd.daemon.server import convert, shm
from ckptd.daemon.server.auth import ANONYMOUS, Guard
from ckptd.daemon.server.metrics import Metrics
from ckptd.daemon.server.policy import Scope, TokenTable
from ckptd.daemon.server.savestream import SaveStream
from ckptd.daemon.server.status import maps_errors, status_for
from ckptd.protos import segments, streams
from ckptd.protos.v1 import pb, pb_grpc
from google.protobuf.message import DecodeError

log = get_logger("servicer")

Context: TypeAlias = grpc.aio.ServicerContext
# Longest single WaitSave; a client that wants longer calls again.
MAX_WAIT_S = 24 * 3600.0
# A tensor this small is written into a restore segment on the event loop (tens of
# microseconds): a thread hop per small tensor cost more than the write itself.
INLINE_BYTES = 1 << 20
H = TypeVar("H", bound=Callable[..., Any])
R = TypeVar("R")
# run/rank/step of the request being handled, for its error line; each RPC runs in a task of
# its own, so each sees only its own value. A save sets it once its header is read.
_REQUEST_FIELDS: contextvars.ContextVar[dict[str, object]] = contextvars.ContextVar(
    "ckptd_request_fields"
)


SERVICE = pb.DESCRIPTOR.services_by_name["CheckpointdService"]
# How much of a client-supplied name or decoder message a status repeats: enough to
# recognize it, and far below the client's 8 KiB metadata limit.
MAX_ECHO_CHARS = 64


def echo(text: str) -> str:
    """``text`` shortened to ``MAX_ECHO_CHARS`` for a message (a 10 kB name stays short)."""
    return text if len(text) <= MAX_ECHO_CHARS else f"{text[:MAX_ECHO_CHARS]}..."


class MalformedMessage:
    """What a request that does not parse as its message type deserializes to, so that the
    handler, not gRPC, answers it: INVALID_ARGUMENT, where gRPC itself would say UNKNOWN."""

    def __init__(self, type_name: str, error: DecodeError) -> None:
        self.problem = f"request is not a valid {type_name} message: {echo(str(error))}"


def _lenient(message_type: Any) -> Callable[[bytes], Any]:
    parse = _PARSERS.get(message_type, message_type.FromString)

    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError as exc:  # invalid UTF-8 in a string field is one too
            return MalformedMessage(message_type.DESCRIPTOR.full_name, exc)

    return deserialize


# Save chunks are parsed by hand into views of the received bytes (savestream.py).
_PARSERS: dict[Any, Callable[[bytes], Any]] = {pb.SaveRequest: streams.decode_request}


_HANDLER_KINDS = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
}


def add_to_server(servicer: CheckpointdServicer, server: grpc.aio.Server) -> None:
    """Registers ``servicer`` like the generated ``add_CheckpointdServiceServicer_to_server``,
    but with deserializers that hand malformed requests to the handler (``MalformedMessage``)."""
    handlers = {}
    for method in SERVICE.methods:
        kind = _HANDLER_KINDS[(method.client_streaming, method.server_streaming)]
        handlers[method.name] = kind(
            getattr(servicer, method.name),
            request_deserializer=_lenient(getattr(pb, method.input_type.name)),
            response_serializer=_serialize,
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))
    server.add_registered_method_handlers(SERVICE.full_name, handlers)


def _serialize(message: Any) -> bytes:
    """Serializes a response message; bytes (restore chunks encoded by hand,
    ``streams.encode_chunk``) pass through as they are."""
    return message if isinstance(message, bytes) else message.SerializeToString()


async def _well_formed(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        yield _checked(request)


def _checked(request: Any) -> Any:
    if isinstance(request, MalformedMessage):
        raise InvalidRequestError(request.problem)
    return request


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
                async for reply in handler(self, _checked(request), context):
                    yield reply
            except Exception as exc:
                count(self, exc)
                raise

        return maps_errors(stream, _subject)  # type: ignore[return-value]

    @functools.wraps(handler)
    async def unary(self: CheckpointdServicer, request: Any, context: Context) -> Any:
        _REQUEST_FIELDS.set(_request_fields(request))
        try:
            if hasattr(request, "__aiter__"):  # a client stream: its messages are checked
                return await handler(self, _well_formed(request), context)
            return await handler(self, _checked(request), context)
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
            value = getattr(ref, name)
            named[name] = echo(value) if isinstance(value, str) else value
    return named


class CheckpointdServicer(pb_grpc.CheckpointdServiceServicer):
    """Adapts the ``Engine`` to the ckptd.v1 gRPC API.

    Each handler first asks ``guard`` (``daemon/server/auth.py``) for the scope it needs:
    Save ``write``; WaitSave, Restore and ListSteps ``read``; DeleteStep, DeleteRun and
    SetRetention (which deletes) ``delete``, each on the request's run. ListRuns needs an
    identity and lists the runs it may read; GetServerInfo needs an identity only. Without
    ``guard``: open mode.
    """

    def __init__(
        self,
        engine: Engine,
        server_info: pb.ServerInfo,
        max_chunk_bytes: int,
        metrics: Metrics,
        *,
        guard: Guard | None = None,
        stream_idle_timeout_s: float = 60.0,
    ) -> None:
        self._engine = engine
        self._server_info = server_info
        self._max_chunk_bytes = max_chunk_bytes
        self._metrics = metrics
        self._guard = guard or Guard(None, TokenTable({}), unix_socket=False, metrics=metrics)
        self._idle_timeout_s = stream_idle_timeout_s

    @rpc
    async def Save(
        self, request_iterator: AsyncIterator[streams.Request], context: Context
    ) -> pb.SaveResponse:
        stream = SaveStream(request_iterator, self._idle_timeout_s)
        message = await stream.header()
        header = convert.header_from_proto(message)
        key = header.key
        _REQUEST_FIELDS.set({"run": echo(key.run), "rank": key.rank, "step": key.step})
        # Before the segment is opened or any budget reserved for it.
        identity = self._guard.require(context, Scope.WRITE, key.run)
        segment = _segment_ref(message)
        if segment is not None:
            shm.check_layout(segment, header.tensors)
        # The segment is opened and checked before the step and budget are reserved.
        with _open_segment(segment, context) as opened:
            share = _share_of(identity, context)
            session = await self._engine.open_save(header, identity=share)
            async with session:
                if opened is None:
                    await stream.receive(session, self._max_chunk_bytes)
                else:
                    await stream.expect_end(opened.ref.name)
                    await _off_loop(shm.copy_into, session, opened)
                status = await session.commit()
        log.info("save accepted %s", step_fields(
            header.key, bytes=header.nbytes, tensors=len(header.tensors),
            transport="shm" if segment else "stream", identity=identity,
        ))
        return pb.SaveResponse(status=convert.status_to_proto(status))

    async def _write(self, context: Context, message: pb.RestoreResponse | bytes) -> None:
        """Writes one restore message once flow control takes it; ``StreamIdleError`` when
        the client reads nothing for the idle timeout."""
        try:
            await asyncio.wait_for(context.write(message), self._idle_timeout_s)
        except asyncio.TimeoutError:
            raise StreamIdleError(
                f"the restore's client read nothing for {self._idle_timeout_s:g} s (the "
                "daemon's stream_idle_timeout_s); it was ended and its memory released"
            ) from None

    async def _restore_into(
        self, context: Context, restored: StreamedCheckpoint, segment: shm.OpenSegment
    ) -> None:
        """Sizes the client's segment from the tensor table, sends the header with the
        offsets, then writes each tensor as the engine hands it over (a step from storage:
        as soon as it is decoded, while the next are read and decoded), announcing each
        batch once written; the last only after the engine's iterator ended, i.e. after
        the step's checksum matched."""
        sizes = [spec.nbytes for spec in restored.tensors]
        ref = shm.size_for_restore(segment, sizes)
        header = convert.restore_header_to_proto(restored)
        header.shared_memory.CopyFrom(_segment_ref_to_proto(ref))
        await self._write(context, pb.RestoreResponse(header=header))
        ends = shm.ready_batches(sizes)
        index = 0
        async for array in restored.arrays:
            # Written before the next is asked for: the engine reuses an array's memory then.
            write = functools.partial(shm.write_tensors, segment, ref, {index: array})
            if array.nbytes <= INLINE_BYTES:
                write(range(index, index + 1))
            else:
                await _off_loop(write, range(index, index + 1))
            index += 1
            if index == ends[0] and index < len(sizes):  # the last waits for the checksum
                await self._write(context, pb.RestoreResponse(segment_ready=ends.pop(0)))
        await self._write(context, pb.RestoreResponse(segment_ready=len(sizes)))

    @rpc
    async def WaitSave(
        self, request: pb.WaitSaveRequest, context: Context
    ) -> pb.WaitSaveResponse:
        if math.isnan(request.timeout_s) or request.timeout_s < 0:
            raise InvalidRequestError(f"timeout_s must be >= 0, got {request.timeout_s}")
        self._guard.require(context, Scope.READ, request.ref.run)
        key = convert.key_from_ref(request.ref)
        status = await self._engine.wait(key, min(request.timeout_s, MAX_WAIT_S))
        return pb.WaitSaveResponse(status=convert.status_to_proto(status))

    @rpc
    async def Restore(self, request: pb.RestoreRequest, context: Context) -> None:
        identity = self._guard.require(context, Scope.READ, request.run)
        started_s = time.monotonic()
        step = request.step if request.HasField("step") else None
        segment = _restore_segment(request)
        # The segment is opened and checked before the restore budget is reserved.
        share = _share_of(identity, context)
        with _open_segment(segment, context, writable=True) as opened:
            if opened is None:
                async with self._engine.restoring(
                    request.run, request.rank, step, identity=share,
                    allow_incomplete=request.allow_incomplete,
                ) as restored:
                    # Materializing (budget, decode, verify) vs sending: which to speed up.
                    prepare_s = time.monotonic() - started_s
                    header = convert.restore_header_to_proto(restored)
                    await self._write(context, pb.RestoreResponse(header=header))
                    for chunk in convert.restore_chunks(restored, self._max_chunk_bytes):
                        await self._write(context, chunk)
            else:
                async with self._engine.restoring_streamed(
                    request.run, request.rank, step, identity=share,
                    allow_incomplete=request.allow_incomplete,
                ) as streamed:
                    # Budget and plan only: decoding overlaps the writes (stream_s).
                    prepare_s = time.monotonic() - started_s
                    await self._restore_into(context, streamed, opened)
        served: RestoredCheckpoint | StreamedCheckpoint = streamed if opened else restored
        seconds = time.monotonic() - started_s
        nbytes = sum(spec.nbytes for spec in served.tensors)
        self._metrics.restore_done(seconds, nbytes)
        log.info("restore served %s", step_fields(
            served.key, bytes=nbytes, tensors=len(served.tensors), seconds=round(seconds, 4),
            prepare_s=round(prepare_s, 4), stream_s=round(seconds - prepare_s, 4),
            transport="shm" if segment else "stream"))

    @rpc
    async def ListRuns(
        self, request: pb.ListRunsRequest, context: Context
    ) -> pb.ListRunsResponse:
        identity = self._guard.identify(context)
        await self._engine.refresh_catalog()
        runs = [info for info in self._engine.list_runs()
                if self._guard.allows(identity, Scope.READ, info.run)]
        return pb.ListRunsResponse(runs=[convert.run_info_to_proto(info) for info in runs])

    @rpc
    async def ListSteps(
        self, request: pb.ListStepsRequest, context: Context
    ) -> pb.ListStepsResponse:
        self._guard.require(context, Scope.READ, request.run)
        await self._engine.refresh_catalog(request.run, request.rank)
        steps = self._engine.list_steps(request.run, request.rank)
        return pb.ListStepsResponse(steps=[convert.step_info_to_proto(info) for info in steps])

    @rpc
    async def DeleteStep(
        self, request: pb.DeleteStepRequest, context: Context
    ) -> pb.DeleteStepResponse:
        self._guard.require(context, Scope.DELETE, request.ref.run)
        key = convert.key_from_ref(request.ref)
        deleted = await self._engine.delete_step(key)
        log.info("step deleted %s", step_fields(key))
        return pb.DeleteStepResponse(deleted_steps=deleted)

    @rpc
    async def DeleteRun(
        self, request: pb.DeleteRunRequest, context: Context
    ) -> pb.DeleteRunResponse:
        self._guard.require(context, Scope.DELETE, request.run)
        deleted = await self._engine.delete_run(request.run)
        log.info("run deleted %s", fields(run=request.run, steps=deleted))
        return pb.DeleteRunResponse(deleted_steps=deleted)

    @rpc
    async def SetRetention(
        self, request: pb.SetRetentionRequest, context: Context
    ) -> pb.SetRetentionResponse:
        self._guard.require(context, Scope.DELETE, request.run)
        policy = convert.retention_from_proto(request.policy)
        await self._engine.set_retention(request.run, policy)
        return pb.SetRetentionResponse(policy=policy.to_message())

    @rpc
    async def GetServerInfo(
        self, request: pb.GetServerInfoRequest, context: Context
    ) -> pb.GetServerInfoResponse:
        self._guard.identify(context)
        return pb.GetServerInfoResponse(info=self._server_info)


def _segment_ref(header: pb.SaveHeader) -> shm.SegmentRef | None:
    if not header.HasField("shared_memory"):
        return None
    ref = header.shared_memory
    return shm.SegmentRef(ref.segment_name, ref.segment_bytes, tuple(ref.offsets))


def peer_uid(context: Context) -> int | None:
    """The uid of the client on the other end of ``context``, or None when unknown (TCP).

    gRPC Python does not expose the connection's ``SO_PEERCRED``, so a unix-socket peer is
    the daemon's own user by construction: connecting needs write permission on the socket,
    and the daemon creates it owner-only (0600, ``ckptd.daemon.server.listen``), so the
    kernel lets only that user (and root) connect — the same rule ``auth.Guard`` applies.
    """
    return os.geteuid() if context.peer().startswith("unix:") else None


def _segment_ref_to_proto(ref: shm.SegmentRef) -> pb.SharedMemoryRef:
    return pb.SharedMemoryRef(
        segment_name=ref.name, segment_bytes=ref.segment_bytes, offsets=ref.offsets)


def _restore_segment(request: pb.RestoreRequest) -> shm.SegmentRef | None:
    if not request.HasField("shared_memory"):
        return None
    ref = request.shared_memory
    if (problem := segments.name_problem(ref.segment_name)) is not None:
        raise InvalidRequestError(problem)
    return shm.SegmentRef(ref.segment_name, 0, ())


def _open_segment(
    segment: shm.SegmentRef | None, context: Context, *, writable: bool = False
) -> contextlib.AbstractContextManager[shm.OpenSegment | None]:
    if segment is None:
        return contextlib.nullcontext()
    return shm.open_segment(segment, peer_uid(context), writable=writable)


async def _off_loop(copy_fn: Callable[..., R], *args: Any) -> R:
    """Runs a blocking copy in a thread; if the RPC is cancelled meanwhile, waits for the
    copy to stop touching its buffers (and the segment) before the cancellation goes on."""
    copy = asyncio.ensure_future(asyncio.to_thread(copy_fn, *args))
    try:
        return await asyncio.shield(copy)
    except asyncio.CancelledError:
        await asyncio.wait([copy])
        copy.exception()  # retrieved: the cancellation is what this RPC reports
        raise


def _share_of(identity: str, context: Context) -> str:
    """Whose share of the budgets a request counts in: its authenticated identity, or, with
    no authentication configured (every caller anonymous), its gRPC peer, one per client
    channel, so that separate trainers still get separate shares."""
    return (context.peer() or identity) if identity == ANONYMOUS else identity
