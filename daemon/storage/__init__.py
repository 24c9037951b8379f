"""Storage backends chosen by URL scheme, and the interface they share.

``open_storage("/var/lib/ckptd")`` or ``open_storage("file:///var/lib/ckptd")`` opens a local
directory (created if missing); ``open_storage("s3://bucket/prefix")`` an S3-compatible
store. Backends are imported only when their scheme is opened, so boto3 is needed only for
``s3://``. ``register_backend`` adds a scheme. See ``base`` for the contract every backend
meets (atomic ``put``; the manifest's ``put`` is a checkpoint's commit point).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ckptd.daemon.storage.base import (
    KeyNotFoundError,
    Storage,
    StorageError,
    validate_key,
    validate_prefix,
)
from ckptd.daemon.storage.local import LocalStorage

if TYPE_CHECKING:
    from ckptd.daemon.storage.s3 import S3Storage

__all__ = [
    "KeyNotFoundError",
    "LocalStorage",
    "S3Storage",
    "Storage",
    "StorageError",
    "StorageFactory",
    "known_schemes",
    "open_storage",
    "register_backend",
    "validate_key",
    "validate_prefix",
]

StorageFactory = Callable[..., Storage]
"""Called as ``factory(url, **options)`` with the full URL (scheme included)."""

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def _open_local(url: str, **options: Any) -> Storage:
    # The rest of a file:// URL is taken literally as the path (no percent-decoding), so the
    # normalized url "file://" + absolute path always reopens the same directory.
    match = _SCHEME.match(url)
    path = url[match.end() :] if match else url
    if path.startswith("localhost/"):
        path = path[len("localhost") :]
    return LocalStorage(path, **options)


def _open_s3(url: str, **options: Any) -> Storage:
    try:
        from ckptd.daemon.storage.s3 import S3Storage
    except ImportError as exc:
        raise ImportError(
            f"the s3:// storage backend needs boto3 ({exc}); install it with: "
            "pip install 'ckptd[s3]'"
        ) from exc
    return S3Storage.from_url(url, **options)


_BACKENDS: dict[str, StorageFactory] = {"file": _open_local, "s3": _open_s3}


def register_backend(scheme: str, factory: StorageFactory, *, replace: bool = False) -> None:
    """Makes ``open_storage`` open ``scheme://...`` URLs with ``factory``.

    Raises:
        ValueError: ``scheme`` is malformed, or already registered and not ``replace``.
    """
    scheme = scheme.lower()
    if not _SCHEME.match(f"{scheme}://"):
        raise ValueError(f"invalid URL scheme {scheme!r}")
    if scheme in _BACKENDS and not replace:
        raise ValueError(f"storage scheme {scheme!r} is already registered (pass replace=True)")
    _BACKENDS[scheme] = factory


def known_schemes() -> list[str]:
    """The registered URL schemes, sorted."""
    return sorted(_BACKENDS)


def open_storage(
    url: str | os.PathLike[str], *, file_mode: int | None = None, **options: Any
) -> Storage:
    """Opens the storage that ``url`` names; ``options`` go to the backend's constructor.

    Args:
        url: ``scheme://...`` for a registered scheme, or a plain filesystem path.
        file_mode: Mode of the files a local directory gets (default 0600, directories
            0700); ignored by object stores, which have no file modes.
        **options: Backend keyword arguments (e.g. ``endpoint_url`` for ``s3``).

    Raises:
        ValueError: empty URL, or a scheme nobody registered (the message lists the known ones).
        ImportError: the backend's optional dependency is missing (the message says what to
            install).
        StorageError: the backend could not open the location.
    """
    url = os.fspath(url)
    if not url:
        raise ValueError("storage URL must not be empty (use a path, file://... or s3://...)")
    match = _SCHEME.match(url)
    scheme = match.group(1).lower() if match else "file"
    if file_mode is not None and scheme == "file":
        options["file_mode"] = file_mode
    if match is None:
        return _open_local(url, **options)
    factory = _BACKENDS.get(scheme)
    if factory is None:
        raise ValueError(
            f"unknown storage scheme {scheme!r} in {url!r}; known schemes: "
            f"{', '.join(known_schemes())} (or a plain path)"
        )
    return factory(url, **options)


def __getattr__(name: str) -> Any:
    # S3Storage is re-exported lazily so that importing this package never imports boto3.
    if name == "S3Storage":
        from ckptd.daemon.storage.s3 import S3Storage

        return S3Storage
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
