"""The daemon's exception tree.

Every error the engine raises on purpose is a ``CkptdError``; each subclass also refines the
builtin it means (``StepNotFoundError`` is a ``LookupError``), so callers outside ckptd can
catch it idiomatically. Each class names its ``reason``: the ``ErrorReason`` value of the
wire contract (``ckptd.v1``) that clients use to tell errors apart; it is a plain string
here so that this module imports nothing, and a test checks every one against the proto.
The gRPC layer maps classes to status codes in one table (``ckptd.daemon.server.status``);
nothing below the transport knows about status codes.
"""

from __future__ import annotations


class CkptdError(Exception):
    """Raised for any failure the daemon reports on purpose (base of the tree)."""

    reason: str = "ERROR_REASON_INTERNAL"


class InvalidRequestError(CkptdError, ValueError):
    """Raised when a request contradicts itself or the daemon's limits (names, shapes, sizes)."""

    reason = "ERROR_REASON_INVALID_REQUEST"


class IncompleteStreamError(InvalidRequestError):
    """Raised when a save stream ends before every byte the header announced has arrived."""

    reason = "ERROR_REASON_INCOMPLETE_STREAM"


class RunNotFoundError(CkptdError, LookupError):
    """Raised when a run (or a rank of it) has no committed step."""

    reason = "ERROR_REASON_RUN_NOT_FOUND"


class StepNotFoundError(CkptdError, LookupError):
    """Raised when a step of a known run does not exist (never saved, deleted, or failed)."""

    reason = "ERROR_REASON_STEP_NOT_FOUND"


class StepExistsError(CkptdError, FileExistsError):
    """Raised when a save names a step that is already saved or in flight for its run/rank."""

    reason = "ERROR_REASON_STEP_EXISTS"


class StepOrderError(CkptdError, ValueError):
    """Raised when a save's step is not greater than the latest step of its run/rank."""

    reason = "ERROR_REASON_STEP_ORDER"


class BusyError(CkptdError):
    """Raised when the in-flight byte budget is full and the client asked not to wait."""

    reason = "ERROR_REASON_BUSY"


class ShuttingDownError(CkptdError):
    """Raised when a new save arrives after the daemon started draining for shutdown."""

    reason = "ERROR_REASON_SHUTTING_DOWN"


class CorruptCheckpointError(CkptdError, ValueError):
    """Raised when stored bytes fail their checksum or cannot be decoded."""

    reason = "ERROR_REASON_CORRUPT_CHECKPOINT"


class StorageError(CkptdError, OSError):
    """Raised when the storage backend fails (I/O error, permission, network)."""

    reason = "ERROR_REASON_STORAGE_UNAVAILABLE"


class KeyNotFoundError(StorageError, FileNotFoundError):
    """Raised when a storage key does not exist."""

    reason = "ERROR_REASON_DATA_MISSING"


class StorageFullError(StorageError):
    """Raised when storage has no room for a write an operation needs (a save's blobs, a
    deletion's rebase): the file system or quota is full; nothing was changed."""

    reason = "ERROR_REASON_STORAGE_FULL"


class StorageInUseError(StorageError):
    """Raised when another process (a daemon, a direct ``ckptd rm``) writes the storage."""

    reason = "ERROR_REASON_STORAGE_IN_USE"


class ChainLeasedError(StorageInUseError):
    """Raised when another daemon holds the writer lease of a (run, rank) chain (or took it
    over from this one): one writer per chain, enforced by the store; the message names the
    holder and when its lease expires."""

    reason = "ERROR_REASON_CHAIN_LEASED"


class SharedMemoryRefusedError(CkptdError, OSError):
    """Raised when the daemon cannot open a save's shared-memory segment (another host or
    ``/dev/shm``, another user): the client should stream the bytes instead."""

    reason = "ERROR_REASON_SHARED_MEMORY_REFUSED"


class UnauthenticatedError(CkptdError, PermissionError):
    """Raised when a call carries no credentials the daemon accepts (no token or an unknown
    one, no verified client certificate, not the daemon's own user on its unix socket)."""

    reason = "ERROR_REASON_UNAUTHENTICATED"


class PermissionDeniedError(CkptdError, PermissionError):
    """Raised when the policy grants the caller's identity no such scope on the run."""

    reason = "ERROR_REASON_PERMISSION_DENIED"


class StepIncompleteError(CkptdError, LookupError):
    """Raised when a step of a run with a world is restored (or a latest complete step is
    asked for) before every rank of that world committed it; the message names the
    missing ranks."""

    reason = "ERROR_REASON_STEP_INCOMPLETE"


class StreamIdleError(CkptdError, TimeoutError):
    """Raised when a stream's client sends (or reads) nothing for ``stream_idle_timeout_s``:
    the daemon ends it and releases its step and budget, so an idle or vanished client
    holds nothing."""

    reason = "ERROR_REASON_STREAM_IDLE"
