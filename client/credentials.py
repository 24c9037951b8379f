"""How the client proves who it is: TLS files and a bearer token (torch-free).

``open_channel`` makes the gRPC channel (TLS when ``tls`` is given, plaintext otherwise) and
``call_metadata`` the ``authorization: Bearer`` metadata sent with every call. The token
travels as plain call metadata rather than gRPC call credentials because gRPC refuses those
on a channel without TLS, and a token over loopback or a unix socket is legitimate. The
``Checkpointer`` and the ``ckptd`` CLI share both, so they authenticate alike.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

TOKEN_ENV = "CKPTD_TOKEN"
Metadata = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class TlsFiles:
    """PEM files for a TLS connection to the daemon.

    Attributes:
        ca: CA bundle that signed the daemon's certificate; None: the system's roots.
        cert: This client's certificate chain, for a daemon that requires mTLS.
        key: The private key of ``cert``.
    """

    ca: str | None = None
    cert: str | None = None
    key: str | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError(f"a client certificate needs its key and the key its certificate; "
                             f"got cert={self.cert!r}, key={self.key!r}")


TlsArg = str | TlsFiles | None
"""``tls=``: a CA file (``str``), ``TlsFiles``, or None for plaintext."""


def tls_files(tls: TlsArg) -> TlsFiles | None:
    """Normalizes the ``tls=`` argument: a string is the CA file."""
    if tls is None or isinstance(tls, TlsFiles):
        return tls
    if isinstance(tls, str):
        return TlsFiles(ca=tls)
    raise ValueError(f"tls must be a CA file path, TlsFiles or None, got {tls!r}")


def open_channel(
    target: str, tls: TlsFiles | None, options: Sequence[tuple[str, Any]]
) -> grpc.Channel:
    """A channel to ``target``: TLS with ``tls``'s files, else plaintext."""
    if tls is None:
        return grpc.insecure_channel(target, options=list(options))
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read(tls.ca, "CA") if tls.ca else None,
        private_key=_read(tls.key, "key") if tls.key else None,
        certificate_chain=_read(tls.cert, "certificate") if tls.cert else None,
    )
    return grpc.secure_channel(target, credentials, options=list(options))


def resolve_token(token: str | None, environ: Mapping[str, str]) -> str | None:
    """``token``, else ``$CKPTD_TOKEN``, else None (no token sent)."""
    chosen = token if token is not None else environ.get(TOKEN_ENV)
    return chosen.strip() or None if chosen is not None else None


def call_metadata(token: str | None) -> Metadata:
    """The metadata every call carries: the bearer token, when there is one."""
    return (("authorization", f"Bearer {token}"),) if token else ()


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read the TLS {what} file {path!r}: "
                         f"{exc.strerror or exc}") from exc
