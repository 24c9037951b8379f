"""Binding the daemon's one listener: TLS on TCP, an owner-only unix socket.

``bind`` is called once, after the gRPC server is built and before it starts. A TCP
listener gets TLS when ``tls_cert``/``tls_key`` are set, with client certificates required
and verified when ``tls_client_ca`` is set (gRPC Python can require a client certificate or
not ask for one; it cannot ask and let a call without one through, so under mTLS a probe
needs a certificate too: ``healthcheck --tls-cert``). Refusing a non-loopback listener
without authentication is ``DaemonConfig``'s job, before anything starts.

A unix socket is created mode 0600 and never reachable with a wider mode, not even for an
instant: gRPC binds it inside a fresh 0700 directory next to the requested path, we chmod
it there, then rename it into place. Connecting to a socket needs write permission on it,
so the kernel admits the daemon's own uid (and root) only; ``auth.py`` relies on that to
name every peer of the socket by the daemon's uid.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import grpc
from ckptd.daemon.config import DaemonConfig

SOCKET_MODE = 0o600


def bind(server: grpc.aio.Server, config: DaemonConfig) -> str:
    """Binds ``config.listen`` (``host:port``, port 0 allowed, or ``unix:///path``);
    returns the address clients should dial, with the real port."""
    listen = config.listen
    if listen.startswith("unix:"):
        return _bind_private_socket(server, socket_path(listen))
    host, sep, requested = listen.rpartition(":")
    if not sep or not requested.isdigit():
        raise ValueError(f"listen address {listen!r} must be HOST:PORT or unix:///PATH")
    credentials = server_credentials(config)
    try:
        if credentials is None:
            port = server.add_insecure_port(listen)
        else:
            port = server.add_secure_port(listen, credentials)
    except RuntimeError as exc:
        raise OSError(f"cannot listen on {listen!r}: {exc}") from exc
    if port == 0:
        raise OSError(f"cannot listen on {listen!r}: the port is in use or the host is unknown")
    return f"{host}:{port}"


def server_credentials(config: DaemonConfig) -> grpc.ServerCredentials | None:
    """TLS credentials from the configured PEM files, or None without ``tls_cert``."""
    if not config.tls_cert:
        return None
    key, chain = _read_pem(config.tls_key, "tls_key"), _read_pem(config.tls_cert, "tls_cert")
    client_ca = _read_pem(config.tls_client_ca, "tls_client_ca") if config.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(key, chain)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def socket_path(listen: str) -> Path:
    """The file of a ``unix:///abs``, ``unix:/abs`` or ``unix:relative`` address."""
    rest = listen[len("unix:"):]
    return Path(rest[2:] if rest.startswith("//") else rest)


def socket_identity(listen: str) -> tuple[Path, int] | None:
    """(path, inode) of the socket just bound, so that stopping removes ours and only ours."""
    if not listen.startswith("unix:"):
        return None
    path = socket_path(listen)
    return path, path.stat().st_ino


def remove_socket(path: Path, inode: int) -> None:
    """Unlinks the daemon's socket file unless another process has replaced it since."""
    with contextlib.suppress(OSError):
        if path.stat().st_ino == inode:
            path.unlink()


def _bind_private_socket(server: grpc.aio.Server, path: Path) -> str:
    private = Path(tempfile.mkdtemp(prefix=".ckptd-bind-", dir=path.parent))  # mode 0700
    staged = private / "s"
    try:
        try:
            server.add_insecure_port(f"unix://{staged}")
        except RuntimeError as exc:
            raise OSError(f"cannot listen on unix://{path}: {exc}") from exc
        os.chmod(staged, SOCKET_MODE)
        os.replace(staged, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            staged.unlink()
        private.rmdir()
    return f"unix://{path}"


def _read_pem(path: str, setting: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise OSError(f"cannot read {setting} {path!r}: {exc.strerror or exc}") from exc
