"""The client's exception tree, and the one place gRPC status codes become exceptions.

Every error the client raises on purpose is a ``CkptdClientError``. Each subclass also
refines the builtin it means, so code that knows nothing about ckptd can still catch it
idiomatically (``except ConnectionError``, ``except LookupError``, ``except TimeoutError``)::

    CkptdClientError
    ├── DaemonUnavailableError (ConnectionError)   UNAVAILABLE, no daemon within the timeout
    ├── CkptdTimeoutError (TimeoutError)            DEADLINE_EXCEEDED, client-side waits
    ├── CheckpointNotFoundError (LookupError)       NOT_FOUND
    ├── InvalidCheckpointError (ValueError)         INVALID_ARGUMENT, OUT_OF_RANGE
    │   └── StepConflictError                       ALREADY_EXISTS, FAILED_PRECONDITION, ABORTED
    ├── DaemonBusyError                             RESOURCE_EXHAUSTED
    │   └── SaveSkippedError                        a save the client skipped (busy)
    ├── CorruptCheckpointError (ValueError)         DATA_LOSS
    ├── PermissionDeniedError (PermissionError)     PERMISSION_DENIED, UNAUTHENTICATED
    ├── RequestCancelledError                       CANCELLED
    ├── InternalDaemonError                         INTERNAL, UNKNOWN, UNIMPLEMENTED
    ├── SaveFailedError                             the daemon reported the save FAILED
    └── SnapshotConflictError (RuntimeError)        a saved tensor changed during an
                                                    overlapped copy (snapshot="overlap")

``map_rpc_error`` is the only function that looks at a ``grpc.StatusCode``; every RPC the
client makes goes through it (``raise map_rpc_error(exc, ...) from exc``), and a test walks
every status code to keep the table complete.
"""

from __future__ import annotations

import grpc


class CkptdClientError(Exception):
    """Raised for any failure the ckptd client reports (base of the tree).

    Attributes:
        code: Name of the gRPC status code behind the error (``"UNAVAILABLE"``), or
            ``None`` when the client detected the problem itself.
        details: The daemon's own description of the problem, verbatim.
    """

    code: str | None = None
    details: str = ""


class DaemonUnavailableError(CkptdClientError, ConnectionError):
    """Raised when no daemon answers at the target (down, restarting, or wrong address)."""


class CkptdTimeoutError(CkptdClientError, TimeoutError):
    """Raised when a call or a wait for a save runs past its deadline."""


class CheckpointNotFoundError(CkptdClientError, LookupError):
    """Raised when the requested run, rank or step does not exist in the daemon."""


class InvalidCheckpointError(CkptdClientError, ValueError):
    """Raised when the daemon refuses a request as malformed or beyond its limits."""


class StepConflictError(InvalidCheckpointError):
    """Raised when a save's step already exists or is not after the run's latest step."""


class DaemonBusyError(CkptdClientError):
    """Raised when the daemon's in-flight byte budget is full and the save did not wait."""


class SaveSkippedError(DaemonBusyError):
    """Raised when ``SaveHandle.wait_*`` waits on a save the client skipped as busy."""


class CorruptCheckpointError(CkptdClientError, ValueError):
    """Raised when stored or streamed checkpoint bytes fail verification."""


class PermissionDeniedError(CkptdClientError, PermissionError):
    """Raised when the daemon refuses the caller's identity or access rights."""


class RequestCancelledError(CkptdClientError):
    """Raised when an RPC was cancelled (by ``close()`` or by the daemon shutting down)."""


class InternalDaemonError(CkptdClientError):
    """Raised when the daemon fails unexpectedly or does not implement the call."""


class SaveFailedError(CkptdClientError):
    """Raised when an accepted save can never become durable (the daemon said FAILED,
    or it restarted before committing the step)."""


class SnapshotConflictError(CkptdClientError, RuntimeError):
    """Set on a save made with ``snapshot="overlap"`` when a saved tensor changed before
    the background copy finished (the save is dropped before it reaches the daemon)."""


_BY_STATUS: dict[grpc.StatusCode, type[CkptdClientError]] = {
    grpc.StatusCode.CANCELLED: RequestCancelledError,
    grpc.StatusCode.UNKNOWN: InternalDaemonError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidCheckpointError,
    grpc.StatusCode.DEADLINE_EXCEEDED: CkptdTimeoutError,
    grpc.StatusCode.NOT_FOUND: CheckpointNotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: StepConflictError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: DaemonBusyError,
    grpc.StatusCode.FAILED_PRECONDITION: StepConflictError,
    grpc.StatusCode.ABORTED: StepConflictError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidCheckpointError,
    grpc.StatusCode.UNIMPLEMENTED: InternalDaemonError,
    grpc.StatusCode.INTERNAL: InternalDaemonError,
    grpc.StatusCode.UNAVAILABLE: DaemonUnavailableError,
    grpc.StatusCode.DATA_LOSS: CorruptCheckpointError,
    grpc.StatusCode.UNAUTHENTICATED: PermissionDeniedError,
}


def error_class_for(code: grpc.StatusCode) -> type[CkptdClientError]:
    """Returns the exception class a status code maps to (``InternalDaemonError`` for OK
    or anything unknown, since a successful status never reaches error handling)."""
    return _BY_STATUS.get(code, InternalDaemonError)


def map_rpc_error(exc: grpc.RpcError, operation: str = "") -> CkptdClientError:
    """Converts a failed RPC into the client's exception tree.

    Args:
        exc: The error gRPC raised; a ``grpc.Call`` carries the status code and details.
        operation: What the client was doing (``"save step 7 of run 'r'"``), put first in
            the message so users see the action, the daemon's reason and the status code.

    Returns:
        The mapped exception, with ``code`` and ``details`` set; raise it ``from exc``.
    """
    code_fn = getattr(exc, "code", None)
    details_fn = getattr(exc, "details", None)
    code = code_fn() if callable(code_fn) else None
    details = (details_fn() if callable(details_fn) else None) or str(exc) or "no details"
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    prefix = f"{operation}: " if operation else ""
    error = error_class_for(code)(f"{prefix}{details} (gRPC status {code.name})")
    error.code = code.name
    error.details = details
    return error
