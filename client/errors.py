"""The client's exception tree, and the one place a failed RPC becomes an exception.

Every error the client raises on purpose is a ``CkptdClientError``. Each subclass also
refines the builtin it means, so code that knows nothing about ckptd can still catch it
idiomatically (``except ConnectionError``, ``except LookupError``, ``except TimeoutError``).
Errors the daemon sends carry an ``ErrorReason`` (``ckptd.protos.status``), which decides
the class; a status without one (raised by gRPC itself) is mapped by its code::

    CkptdClientError
    ├── DaemonUnavailableError (ConnectionError)   SHUTTING_DOWN, STORAGE_UNAVAILABLE;
    │                                               UNAVAILABLE (no daemon within the timeout)
    ├── CkptdTimeoutError (TimeoutError)            DEADLINE_EXCEEDED, client-side waits
    │   └── StreamIdleError                         STREAM_IDLE: a save stream paused too long
    ├── CheckpointNotFoundError (LookupError)       RUN_NOT_FOUND, STEP_NOT_FOUND; NOT_FOUND
    │   └── StepIncompleteError                     STEP_INCOMPLETE: a rank of the world lacks it
    ├── InvalidCheckpointError (ValueError)         INVALID_REQUEST, INCOMPLETE_STREAM;
    │   │                                           INVALID_ARGUMENT, OUT_OF_RANGE
    │   └── StepConflictError                       STEP_EXISTS, STEP_ORDER; ALREADY_EXISTS,
    │                                               FAILED_PRECONDITION, ABORTED
    ├── SharedMemoryRefusedError (OSError)          SHARED_MEMORY_REFUSED: stream instead
    │   └── SharedMemoryFullError                   /dev/shm has no room for a segment
    ├── StorageInUseError                           STORAGE_IN_USE: an operator must act
    │   └── ChainLeasedError                        CHAIN_LEASED: another daemon writes
    │                                               this (run, rank); retry after its lease
    ├── StorageFullError (OSError)                  STORAGE_FULL: free space first
    ├── DaemonBusyError                             BUSY
    │   └── SaveSkippedError                        a save the client skipped (busy)
    ├── GrpcLimitError                              RESOURCE_EXHAUSTED without a reason:
    │                                               one of gRPC's own limits, not busy
    ├── CorruptCheckpointError (ValueError)         CORRUPT_CHECKPOINT, DATA_MISSING; DATA_LOSS
    ├── PermissionDeniedError (PermissionError)     PERMISSION_DENIED; PERMISSION_DENIED
    │   └── UnauthenticatedError                    UNAUTHENTICATED; UNAUTHENTICATED
    ├── RequestCancelledError                       CANCELLED
    ├── InternalDaemonError                         INTERNAL; UNKNOWN, UNIMPLEMENTED
    ├── SaveFailedError                             the daemon reported the save FAILED
    └── SnapshotConflictError (RuntimeError)        a saved tensor changed during an
                                                    overlapped copy (snapshot="overlap")

``map_rpc_error`` is the only function that looks at a status; every RPC the client (and
the ``ckptd`` CLI) makes goes through it (``raise map_rpc_error(exc, ...) from exc``), and
tests walk every ``ErrorReason`` and every status code to keep the tables complete. This
module imports grpc and the wire contract only (no torch), so the daemon's CLI shares it.
"""

from __future__ import annotations

import grpc
from ckptd.protos.status import reason_of


class CkptdClientError(Exception):
    """Raised for any failure the ckptd client reports (base of the tree).

    Attributes:
        code: Name of the gRPC status code behind the error (``"UNAVAILABLE"``), or
            ``None`` when the client detected the problem itself.
        reason: The daemon's ``ErrorReason`` name (``"ERROR_REASON_BUSY"``), or ``None``
            when the status did not come from the daemon's error handling.
        details: The daemon's own description of the problem, verbatim.
    """

    code: str | None = None
    reason: str | None = None
    details: str = ""


class DaemonUnavailableError(CkptdClientError, ConnectionError):
    """Raised when no daemon answers at the target (down, restarting, or wrong address)."""


class CkptdTimeoutError(CkptdClientError, TimeoutError):
    """Raised when a call or a wait for a save runs past its deadline."""


class StreamIdleError(CkptdTimeoutError):
    """Raised when the daemon ended a save stream that sent nothing for its
    ``save_idle_timeout_s``; nothing was stored, and sending the save again is safe."""


class CheckpointNotFoundError(CkptdClientError, LookupError):
    """Raised when the requested run, rank or step does not exist in the daemon."""


class StepIncompleteError(CheckpointNotFoundError):
    """Raised when a step (or the latest complete step) of a run with a world is asked for
    before every rank committed it; the message names the missing ranks. Restore an
    earlier step, or this rank's own copy with ``allow_incomplete=True``."""


class InvalidCheckpointError(CkptdClientError, ValueError):
    """Raised when the daemon refuses a request as malformed or beyond its limits."""


class StepConflictError(InvalidCheckpointError):
    """Raised when a save's step already exists or is not after the run's latest step."""


class SharedMemoryRefusedError(CkptdClientError, OSError):
    """Raised when the daemon cannot open the save's shared-memory segment (another host or
    ``/dev/shm``); with ``transport="auto"`` the client streams instead."""


class SharedMemoryFullError(SharedMemoryRefusedError):
    """Raised by the client itself when ``/dev/shm`` has no room for a staging segment (a
    container's is 64 MB unless given ``--shm-size``); the message names the size and the
    free space. With ``transport="auto"`` the client streams over gRPC instead."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.details = message


class StorageInUseError(CkptdClientError):
    """Raised when the daemon refuses to write because another process writes its storage
    (another daemon, a direct ``ckptd rm``); retrying will not help until one stops."""


class ChainLeasedError(StorageInUseError):
    """Raised when another daemon on the same storage holds the writer lease of the save's
    (run, rank) chain; the message names the holder and its expiry. Save through that
    daemon, or retry once the lease expired (released at once by a clean close)."""


class StorageFullError(CkptdClientError, OSError):
    """Raised when the daemon's storage has no room for a write the call needs (a save's
    blobs, a deletion's rebase); nothing was changed. Free space (the message names a
    deletion that writes nothing), then retry."""


class DaemonBusyError(CkptdClientError):
    """Raised when the daemon's in-flight byte budget is full and the save did not wait."""


class SaveSkippedError(DaemonBusyError):
    """Raised when ``SaveHandle.wait_*`` waits on a save the client skipped as busy."""


class GrpcLimitError(CkptdClientError):
    """Raised when gRPC itself refused a call at one of its limits (RESOURCE_EXHAUSTED
    with no ckptd reason: a message over the daemon's ``--max-message-bytes``, a request
    or a reply). Not the daemon's busy answer (``DaemonBusyError``): the same call fails
    the same way again, so a save ends FAILED, never skipped."""


class CorruptCheckpointError(CkptdClientError, ValueError):
    """Raised when stored or streamed checkpoint bytes fail verification."""


class PermissionDeniedError(CkptdClientError, PermissionError):
    """Raised when the daemon refuses the caller's identity or access rights."""


class UnauthenticatedError(PermissionDeniedError):
    """Raised when the daemon does not accept the caller's credentials (none, an unknown
    token, no client certificate): pass ``token=`` or ``tls=`` (or ``CKPTD_TOKEN``)."""


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


# Errors the daemon raised on purpose: the reason decides (see ErrorReason in the .proto).
_BY_REASON: dict[str, type[CkptdClientError]] = {
    "ERROR_REASON_INVALID_REQUEST": InvalidCheckpointError,
    "ERROR_REASON_INCOMPLETE_STREAM": InvalidCheckpointError,
    "ERROR_REASON_RUN_NOT_FOUND": CheckpointNotFoundError,
    "ERROR_REASON_STEP_NOT_FOUND": CheckpointNotFoundError,
    "ERROR_REASON_STEP_EXISTS": StepConflictError,
    "ERROR_REASON_STEP_ORDER": StepConflictError,
    "ERROR_REASON_BUSY": DaemonBusyError,
    "ERROR_REASON_SHUTTING_DOWN": DaemonUnavailableError,
    "ERROR_REASON_CORRUPT_CHECKPOINT": CorruptCheckpointError,
    "ERROR_REASON_DATA_MISSING": CorruptCheckpointError,
    "ERROR_REASON_STORAGE_IN_USE": StorageInUseError,
    "ERROR_REASON_CHAIN_LEASED": ChainLeasedError,
    "ERROR_REASON_STORAGE_FULL": StorageFullError,
    "ERROR_REASON_STORAGE_UNAVAILABLE": DaemonUnavailableError,
    "ERROR_REASON_SHARED_MEMORY_REFUSED": SharedMemoryRefusedError,
    "ERROR_REASON_INTERNAL": InternalDaemonError,
    "ERROR_REASON_UNAUTHENTICATED": UnauthenticatedError,
    "ERROR_REASON_PERMISSION_DENIED": PermissionDeniedError,
    "ERROR_REASON_STREAM_IDLE": StreamIdleError,
    "ERROR_REASON_STEP_INCOMPLETE": StepIncompleteError,
}

# Statuses without a known reason: from gRPC itself, or a reason newer than this client.
_BY_STATUS: dict[grpc.StatusCode, type[CkptdClientError]] = {
    grpc.StatusCode.CANCELLED: RequestCancelledError,
    grpc.StatusCode.UNKNOWN: InternalDaemonError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidCheckpointError,
    grpc.StatusCode.DEADLINE_EXCEEDED: CkptdTimeoutError,
    grpc.StatusCode.NOT_FOUND: CheckpointNotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: StepConflictError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: GrpcLimitError,
    grpc.StatusCode.FAILED_PRECONDITION: StepConflictError,
    grpc.StatusCode.ABORTED: StepConflictError,
    grpc.StatusCode.OUT_OF_RANGE: InvalidCheckpointError,
    grpc.StatusCode.UNIMPLEMENTED: InternalDaemonError,
    grpc.StatusCode.INTERNAL: InternalDaemonError,
    grpc.StatusCode.UNAVAILABLE: DaemonUnavailableError,
    grpc.StatusCode.DATA_LOSS: CorruptCheckpointError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
}


def error_class_for(code: grpc.StatusCode, reason: str = "") -> type[CkptdClientError]:
    """Returns the exception class of a failed status: by ``reason`` when this client knows
    it, else by ``code`` (``InternalDaemonError`` for OK or an unknown code)."""
    return _BY_REASON.get(reason) or _BY_STATUS.get(code, InternalDaemonError)


def map_rpc_error(exc: grpc.RpcError, operation: str = "") -> CkptdClientError:
    """Converts a failed RPC into the client's exception tree.

    Args:
        exc: The error gRPC raised; a ``grpc.Call`` carries the status code, details and
            the rich status with the daemon's ``ErrorReason``.
        operation: What the client was doing (``"save step 7 of run 'r'"``), put first in
            the message so users see the action, the daemon's reason and the status code.

    Returns:
        The mapped exception, with ``code``, ``reason`` and ``details`` set; raise it
        ``from exc``.
    """
    wire = reason_of(exc)
    prefix = f"{operation}: " if operation else ""
    details = wire.details
    if wire.code is grpc.StatusCode.UNAVAILABLE and not wire.reason:
        details = f"no ckptd daemon answered ({details}); is it running, and is the address right?"
    elif wire.code is grpc.StatusCode.RESOURCE_EXHAUSTED and not wire.reason:
        details = (
            f"gRPC refused the call at one of its own limits ({details}), not because the "
            "daemon was busy: a message larger than the daemon's --max-message-bytes (for a "
            "save, its header: the tensor table, structure and metadata); sending it again "
            "fails the same way: raise the daemon's --max-message-bytes"
            + (", hold long lists and large bytes as tensors, or save fewer tensors"
               if operation.startswith("save ") else "")
        )
    status = f"{wire.reason}, gRPC status {wire.code.name}" if wire.reason else (
        f"gRPC status {wire.code.name}")
    error = error_class_for(wire.code, wire.reason)(f"{prefix}{details} ({status})")
    error.code = wire.code.name
    error.reason = wire.reason or None
    error.details = wire.details
    return error
