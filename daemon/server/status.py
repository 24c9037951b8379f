"""The one table mapping daemon errors to gRPC status codes, and the handler decorator.

Handlers never call ``context.abort``: they raise the engine's errors (or let them pass) and
``maps_errors`` turns each into its status code here. The table is ordered most specific
first; the first class the error is an instance of wins. An error outside the tree is a
bug: it is logged with its traceback and the client sees INTERNAL with a generic message
(never internals). Every error travels as the rich status of the wire contract
(``ckptd.protos.status``): its ``ErrorInfo`` reason is the error class's ``reason``, so a
client tells apart errors that share a code (``RunNotFoundError`` and ``StepNotFoundError``
are both NOT_FOUND) without reading messages.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, NoReturn, TypeVar

import grpc
from ckptd.daemon import errors
from ckptd.daemon.logs import get_logger
from ckptd.protos.status import rich_status

log = get_logger("status")

Subject = Callable[[], Mapping[str, object]]
"""Returns the run/rank/step the failing request names (the ErrorInfo's metadata)."""

STATUS_TABLE: tuple[tuple[type[BaseException], grpc.StatusCode], ...] = (
    # Who is calling comes first: a caller the daemon cannot identify learns nothing else.
    (errors.UnauthenticatedError, grpc.StatusCode.UNAUTHENTICATED),
    (errors.PermissionDeniedError, grpc.StatusCode.PERMISSION_DENIED),
    (errors.IncompleteStreamError, grpc.StatusCode.INVALID_ARGUMENT),
    (errors.InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    # The request is well formed, but the chain's state forbids it (step not after latest).
    (errors.StepOrderError, grpc.StatusCode.FAILED_PRECONDITION),
    # The step exists for this rank, but not yet for every rank of its world.
    (errors.StepIncompleteError, grpc.StatusCode.FAILED_PRECONDITION),
    (errors.RunNotFoundError, grpc.StatusCode.NOT_FOUND),
    (errors.StepNotFoundError, grpc.StatusCode.NOT_FOUND),
    (errors.StepExistsError, grpc.StatusCode.ALREADY_EXISTS),
    (errors.BusyError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (errors.ShuttingDownError, grpc.StatusCode.UNAVAILABLE),
    # The client paused a save stream past save_idle_timeout_s (or vanished silently).
    (errors.StreamIdleError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (errors.CorruptCheckpointError, grpc.StatusCode.DATA_LOSS),
    # A key the index names is gone from storage: data was lost, retrying will not help.
    (errors.KeyNotFoundError, grpc.StatusCode.DATA_LOSS),
    # Another daemon writes this chain (its lease names it); free once that lease expires.
    (errors.ChainLeasedError, grpc.StatusCode.FAILED_PRECONDITION),
    # Another process writes the storage: waiting will not help until an operator acts.
    (errors.StorageInUseError, grpc.StatusCode.FAILED_PRECONDITION),
    # The client's segment is not on this host (or not ours to read): it should stream.
    (errors.SharedMemoryRefusedError, grpc.StatusCode.FAILED_PRECONDITION),
    # No room in storage: retrying will not help until space is freed.
    (errors.StorageFullError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    # Storage I/O failed (network, disk): transient from the client's point of view.
    (errors.StorageError, grpc.StatusCode.UNAVAILABLE),
    # A deliberate error without a more specific class: its message is still safe to show.
    (errors.CkptdError, grpc.StatusCode.INTERNAL),
)

INTERNAL_MESSAGE = "internal error in ckptd daemon; see the daemon's log for the traceback"
# A status travels in trailers, which a client caps (8 KiB by default): messages are cut
# to this, so no request can make its own error unreadable.
MAX_MESSAGE_CHARS = 1024


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """Returns the status code and client-facing message for ``exc``.

    Errors outside the ``CkptdError`` tree get INTERNAL and a generic message: their text
    may hold paths or internals, and they signal a bug rather than a bad request.
    """
    for cls, code in STATUS_TABLE:
        if isinstance(exc, cls):
            message = str(exc) or cls.__name__
            if len(message) > MAX_MESSAGE_CHARS:
                message = f"{message[:MAX_MESSAGE_CHARS]}..."
            return code, message
    return grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE


def reason_for(exc: BaseException) -> str:
    """The ``ErrorReason`` name ``exc`` travels with (INTERNAL outside the tree)."""
    return exc.reason if isinstance(exc, errors.CkptdError) else errors.CkptdError.reason


async def abort_with(
    context: grpc.aio.ServicerContext, exc: Exception, subject: Mapping[str, object]
) -> NoReturn:
    """Aborts the RPC with ``exc``'s rich status; logs unexpected errors with their traceback.

    ``subject`` (the request's run, rank, step) becomes the ErrorInfo's metadata.
    """
    if isinstance(exc, grpc.aio.AbortError):
        raise exc  # already carries its status
    code, message = status_for(exc)
    if not isinstance(exc, errors.CkptdError):
        log.error("unexpected error in handler %s", f"error={type(exc).__name__}", exc_info=exc)
    elif code is grpc.StatusCode.INTERNAL:
        log.error("unclassified daemon error %s", f"error={type(exc).__name__}", exc_info=exc)
    metadata = {name: str(value) for name, value in subject.items()}
    await context.abort_with_status(rich_status(code, reason_for(exc), message, metadata))
    raise AssertionError("context.abort returned")  # pragma: no cover - abort always raises


H = TypeVar("H", bound=Callable[..., Any])


def maps_errors(handler: H, subject: Subject = dict) -> H:
    """Wraps a grpc.aio servicer method (coroutine or async generator) with the table.

    ``subject`` is called after a failure, in the handler's task, for the run/rank/step
    the status's metadata names. Cancellation (``asyncio.CancelledError``) is not an
    ``Exception`` and passes through, so a client that hangs up unwinds the handler (and
    aborts its save) without a status.
    """
    if inspect.isasyncgenfunction(handler):

        @functools.wraps(handler)
        async def stream_wrapper(
            self: Any, request: Any, context: grpc.aio.ServicerContext
        ) -> AsyncIterator[Any]:
            try:
                async for reply in handler(self, request, context):
                    yield reply
            except Exception as exc:
                await abort_with(context, exc, subject())

        return stream_wrapper  # type: ignore[return-value]

    @functools.wraps(handler)
    async def unary_wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await handler(self, request, context)
        except Exception as exc:
            await abort_with(context, exc, subject())

    return unary_wrapper  # type: ignore[return-value]
