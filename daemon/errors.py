"""The daemon's exception tree.

Every error the engine raises on purpose is a ``CkptdError``; each subclass also refines the
builtin it means (``StepNotFoundError`` is a ``LookupError``), so callers outside ckptd can
catch it idiomatically. The gRPC layer maps these to status codes in one table
(``ckptd.daemon.server.status``); nothing below the transport knows about status codes.
"""

from __future__ import annotations


class CkptdError(Exception):
    """Raised for any failure the daemon reports on purpose (base of the tree)."""


class InvalidRequestError(CkptdError, ValueError):
    """Raised when a request contradicts itself or the daemon's limits (names, shapes, sizes)."""


class IncompleteStreamError(InvalidRequestError):
    """Raised when a save stream ends before every byte the header announced has arrived."""


class RunNotFoundError(CkptdError, LookupError):
    """Raised when a run (or a rank of it) has no committed step."""


class StepNotFoundError(CkptdError, LookupError):
    """Raised when a step of a known run does not exist (never saved, deleted, or failed)."""


class StepExistsError(CkptdError, FileExistsError):
    """Raised when a save names a step that is already saved or in flight for its run/rank."""


class StepOrderError(CkptdError, ValueError):
    """Raised when a save's step is not greater than the latest step of its run/rank."""


class BusyError(CkptdError):
    """Raised when the in-flight byte budget is full and the client asked not to wait."""


class ShuttingDownError(CkptdError):
    """Raised when a new save arrives after the daemon started draining for shutdown."""


class CorruptCheckpointError(CkptdError, ValueError):
    """Raised when stored bytes fail their checksum or cannot be decoded."""


class StorageError(CkptdError, OSError):
    """Raised when the storage backend fails (I/O error, permission, network)."""


class KeyNotFoundError(StorageError, FileNotFoundError):
    """Raised when a storage key does not exist."""


class StorageInUseError(StorageError):
    """Raised when another process (a daemon, a direct ``ckptd rm``) writes the storage."""
