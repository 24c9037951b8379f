"""The storage interface: a handful of primitives over bytes and relative keys.

Who calls what: the engine owns one ``Storage`` for the daemon's lifetime. At start it calls
``cleanup_temporaries()`` and ``list()`` to rebuild its index; afterwards it calls ``put``,
``get``, ``size``, ``list`` and ``delete`` from its worker threads (``run_in_executor``), and
``close()`` once at shutdown, after every other call has returned.

Thread safety: every method may be called concurrently from several threads for different
keys. Concurrent calls on the *same* key (two puts, or a put racing a delete) are allowed
and leave one of the outcomes, but which one is unspecified.

Atomic commit: ``put`` is atomic (a reader sees the old object or the whole new one, never
a part) and durable on return. ``put_if_absent`` is the one conditional write: it creates an
object only where none exists, atomically with respect to every other writer of the same
storage (other threads, processes and hosts), so two daemons racing for one key cannot both
win; manifests and chain leases are created with it. A checkpoint is committed by
creating its manifest *after* every blob it names is durable, so that write is the commit
point and no separate commit method is needed; a step whose manifest is absent does not
exist, and its orphaned blobs are garbage for the engine to delete.

Keys are relative, ``/``-separated paths such as
``runs/r1/0/00000000000000000010/manifest.json``. They are validated here, once, so that
every backend accepts exactly the same keys.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable
from types import TracebackType

from ckptd.daemon.errors import KeyNotFoundError, StorageError

__all__ = [
    "MAX_KEY_BYTES",
    "MAX_SEGMENT_BYTES",
    "TEMP_PREFIX",
    "KeyNotFoundError",
    "Storage",
    "StorageError",
    "check_range",
    "validate_key",
    "validate_prefix",
]

# Backends stage in-progress writes under names starting with this; no key segment may.
TEMP_PREFIX = ".tmp-"
# The tightest common limits: a file name on POSIX file systems, an object key on S3.
MAX_SEGMENT_BYTES = 255
MAX_KEY_BYTES = 1024


def validate_key(key: str) -> str:
    """Returns ``key`` unchanged if it is a valid storage key, else raises ``ValueError``.

    A key is a non-empty relative path of ``/``-separated segments; no segment may be empty,
    ``.`` or ``..``, or start with the reserved ``TEMP_PREFIX``; backslashes and NUL are
    refused so that a key means the same file on every platform and backend.
    """
    if not isinstance(key, str):
        raise TypeError(f"storage key must be a str, got {type(key).__name__}: {key!r}")
    problem = _key_problem(key)
    if problem:
        raise ValueError(f"invalid storage key {key!r}: {problem}")
    return key


def is_valid_key(key: str) -> bool:
    """Returns whether ``key`` passes ``validate_key`` (for filtering listings)."""
    return not _key_problem(key)


def _key_problem(key: str) -> str:
    if not key:
        return "must not be empty"
    if "\x00" in key or "\\" in key:
        return "must not contain NUL or backslash (use '/' as separator)"
    if key.startswith("/"):
        return "must be relative (no leading '/')"
    try:
        encoded_bytes = len(key.encode("utf-8"))
    except UnicodeEncodeError:
        return "must be valid UTF-8 (no lone surrogates)"
    if encoded_bytes > MAX_KEY_BYTES:
        return f"is {encoded_bytes} bytes in UTF-8, the limit is {MAX_KEY_BYTES}"
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            return "must not contain empty, '.' or '..' segments"
        if segment.startswith(TEMP_PREFIX):
            return f"segment {segment!r} starts with the reserved prefix {TEMP_PREFIX!r}"
        if len(segment.encode("utf-8")) > MAX_SEGMENT_BYTES:
            return f"segment {segment[:32]!r}... is longer than {MAX_SEGMENT_BYTES} bytes"
    return ""


def validate_prefix(prefix: str) -> str:
    """Returns a valid ``list`` prefix unchanged: ``""`` or a valid key followed by ``/``."""
    if not isinstance(prefix, str):
        raise TypeError(f"storage prefix must be a str, got {type(prefix).__name__}")
    if prefix and (not prefix.endswith("/") or _key_problem(prefix[:-1])):
        raise ValueError(
            f"invalid storage prefix {prefix!r}: must be '' or a directory-like "
            "valid key ending in '/', e.g. 'runs/r1/'"
        )
    return prefix


def check_range(start: int, end: int | None) -> None:
    """Raises ``ValueError`` unless ``0 <= start`` and (``end`` is None or ``start <= end``)."""
    if start < 0 or (end is not None and end < start):
        raise ValueError(f"invalid byte range [{start}, {end}): need 0 <= start <= end")


class Storage(abc.ABC):
    """A flat namespace of immutable-until-overwritten byte objects under relative keys.

    Attributes:
        url: The normalized URL of this storage (``file:///abs/path``, ``s3://bucket/prefix``);
            ``open_storage(url)`` opens the same place again, from any host that can reach it.
    """

    url: str
    # Whether other processes (daemons on other hosts) may write this storage while this one
    # does: true for object stores, which have no lock; false for a local directory, which
    # ``claim`` locks. On shared storage the engine recovers a chain's leftovers only under
    # the chain's lease and refreshes its catalog from storage (README, "Many hosts").
    shared: bool = False

    @abc.abstractmethod
    def put(self, key: str, data: bytes | memoryview) -> None:
        """Stores ``data`` under ``key``, replacing any previous object.

        Atomic (readers see the old object or all of the new one) and durable on return.
        A ``memoryview`` must be C-contiguous; it is written without being copied whole.
        """

    def put_batched(self, key: str, data: bytes | memoryview) -> None:
        """Stores ``data`` under ``key`` like ``put``, except that it need not be durable
        until ``sync`` names ``key``; the caller must not rely on it (commit anything that
        names it) before then. A crash in between may leave the key missing, empty or
        partial, never a key that is not in a batch.

        Lets a backend pay for durability once per batch (one fsync per file and directory
        at the end, rather than a journal commit per blob). The default is ``put``.
        """
        self.put(key, data)

    def sync(self, keys: Iterable[str]) -> None:  # noqa: B027 (optional: put is durable)
        """Makes the ``put_batched`` objects under ``keys`` durable; called once per batch,
        before anything that names them is committed. The default does nothing."""

    @abc.abstractmethod
    def put_if_absent(self, key: str, data: bytes | memoryview) -> bool:
        """Creates the object ``key`` holding ``data`` only if no object exists under ``key``.

        Returns True if this call created it, False if an object already existed (then
        nothing is written and the existing object is unchanged). Of several concurrent
        calls for one key, from any thread, process or host, exactly one returns True.
        Atomic and durable on return like ``put``. Meant for small objects (manifests,
        leases): a backend may send ``data`` in one request.
        """

    @abc.abstractmethod
    def get(self, key: str, *, start: int = 0, end: int | None = None) -> bytes:
        """Returns bytes ``[start, end)`` of the object, clipped to its size like a slice.

        Raises:
            KeyNotFoundError: no object is stored under ``key``.
            ValueError: ``start < 0`` or ``end < start``.
        """

    def read_into(self, key: str, out: memoryview) -> int:
        """Reads the object's first ``len(out)`` bytes into ``out`` (a writable, C-contiguous
        byte view); returns how many it read: the object's size when it fits, so a caller
        that expects ``n`` bytes passes ``n + 1`` to also learn that an object is longer.

        Lets a reader reuse one buffer for many objects (a restore reads each blob into a
        warm buffer instead of freshly allocated bytes). The default copies ``get``'s
        result; backends that can read straight into memory override it.

        Raises:
            KeyNotFoundError: no object is stored under ``key``.
        """
        data = self.get(key, end=len(out))
        out[: len(data)] = data
        return len(data)

    @abc.abstractmethod
    def size(self, key: str) -> int:
        """Returns the object's size in bytes; ``KeyNotFoundError`` if it is absent."""

    @abc.abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Returns every key under ``prefix`` (``""`` or ``"a/b/"``), sorted.

        Keys are full keys (they include ``prefix``); temporaries of in-progress or crashed
        puts are never listed.
        """

    @abc.abstractmethod
    def delete(self, keys: Iterable[str]) -> None:
        """Removes the objects; absent keys are ignored. Durable on return."""

    def move(self, key: str, new_key: str) -> None:
        """Moves the object at ``key`` to ``new_key`` (replacing any object there).

        Durable on return; a crash part-way leaves the object under one of the two keys or
        both, never neither. The default copies through ``get`` and ``put`` and then
        deletes; backends override it with a rename or a server-side copy, so moving a
        large blob neither passes through memory nor, on a local disk, needs free space.
        """
        self.put(new_key, self.get(key))
        self.delete([key])

    def free_bytes(self) -> int | None:
        """Bytes that can still be written, or None when the backend cannot tell (an object
        store has no such limit). A hint for refusing early, never a reservation."""
        return None

    def cleanup_temporaries(self, *, min_age_s: float = 0.0) -> int:
        """Removes leftovers of crashed puts older than ``min_age_s``; returns how many.

        Call it at start, before writing: a temporary younger than ``min_age_s`` may belong
        to another live writer of the same storage. The default does nothing (returns 0).
        """
        del min_age_s
        return 0

    def claim(self, holder: str) -> None:
        """Reserves the storage for writing by this process until ``close``.

        Two daemons on one storage would overwrite each other's steps and delete each
        other's in-progress blobs as leftovers; a direct ``ckptd rm`` under a running daemon
        would delete steps the daemon still builds deltas on. Backends that can lock refuse
        a second claim with ``StorageInUseError``, naming the ``holder`` text of the first
        (e.g. ``"ckptd serve (pid 7 on node-3)"``). The default accepts every claim: object
        stores have no lock, and one daemon per prefix is then the operator's to ensure.
        """
        del holder

    def close(self) -> None:  # noqa: B027 (an optional hook: most backends hold nothing)
        """Releases connections and handles; idempotent. No call may follow it."""

    def __enter__(self) -> Storage:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"
