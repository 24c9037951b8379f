"""Asks a running daemon whether it is serving, through the standard gRPC health service.

Container runtimes and supervisors run this as a probe::

    python -m ckptd.daemon.server.healthcheck                        # the address in CKPTD_LISTEN
    python -m ckptd.daemon.server.healthcheck unix:///run/ckptd/ckptd.sock --timeout-s 2
    python -m ckptd.daemon.server.healthcheck ckptd:50051 --tls-ca /etc/ckptd/tls/ca.crt

It exits 0 when ``grpc.health.v1.Health/Check`` answers SERVING within the deadline and 1
otherwise (refused, timed out, NOT_SERVING while draining, unknown service), printing why
on stderr. It uses the health service rather than a ckptd RPC so that any gRPC health
client (kubelet's ``grpc`` probe, ``grpc_health_probe``) sees the same answer.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import grpc
from ckptd.protos.names import normalize_target
from grpc_health.v1 import health_pb2, health_pb2_grpc

DEFAULT_TARGET = "127.0.0.1:50051"
# A probe connects afresh. By default gRPC shares one connection per target across the
# process's channels, and one whose last attempt failed answers UNAVAILABLE at once until
# its reconnect backoff ends (1 s, growing to 120 s): a probe made in a process that probed
# before the daemon was up (a supervisor, a test) reported a serving daemon unhealthy.
_OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


def check(
    target: str, service: str = "", timeout_s: float = 3.0,
    credentials: grpc.ChannelCredentials | None = None,
) -> str:
    """Returns the serving status name the daemon at ``target`` reports for ``service``.

    ``credentials``: TLS for a daemon serving it (health needs no token; under mTLS the
    handshake needs a client certificate, see ``daemon/server/listen.py``).

    Raises:
        grpc.RpcError: when the call fails (unreachable, deadline, NOT_FOUND service).
    """
    channel = (grpc.insecure_channel(target, options=_OWN_CONNECTION) if credentials is None
               else grpc.secure_channel(target, credentials, options=_OWN_CONNECTION))
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


def _parse_args(argv: Sequence[str] | None, environ: Mapping[str, str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m ckptd.daemon.server.healthcheck",
        description="Exit 0 when the ckptd daemon's gRPC health service reports SERVING.",
    )
    parser.add_argument(
        "target", nargs="?", default=environ.get("CKPTD_LISTEN", DEFAULT_TARGET),
        help="daemon address: HOST:PORT or unix:///PATH (default: $CKPTD_LISTEN, "
        f"else {DEFAULT_TARGET})",
    )
    parser.add_argument(
        "--service", default="", help="health service name to check (default: '', the server)"
    )
    parser.add_argument("--timeout-s", type=float, default=3.0, help="deadline of the call")
    parser.add_argument("--tls-ca", metavar="PEM", help="speak TLS, trusting this CA")
    parser.add_argument("--tls-cert", metavar="PEM", help="client certificate (mTLS daemons)")
    parser.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")
    return parser.parse_args(argv)


def _credentials(args: argparse.Namespace) -> grpc.ChannelCredentials | None:
    if not (args.tls_ca or args.tls_cert):
        return None

    def read(path: str | None) -> bytes | None:
        return Path(path).read_bytes() if path else None

    return grpc.ssl_channel_credentials(read(args.tls_ca), read(args.tls_key),
                                        read(args.tls_cert))


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Runs one health check; returns the process exit code (0 healthy, 1 not)."""
    args = _parse_args(argv, os.environ if environ is None else environ)
    try:
        target = normalize_target(args.target)
    except ValueError as exc:
        print(f"ckptd healthcheck: {exc}", file=sys.stderr)
        return 2
    try:
        status = check(target, args.service, args.timeout_s, _credentials(args))
    except OSError as exc:
        print(f"ckptd healthcheck: cannot read TLS files: {exc}", file=sys.stderr)
        return 2
    except grpc.RpcError as exc:
        code = exc.code() if isinstance(exc, grpc.Call) else None
        details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
        name = code.name if code is not None else "UNKNOWN"
        print(f"ckptd at {target} unhealthy: {name}: {details}", file=sys.stderr)
        return 1
    if status != "SERVING":
        print(f"ckptd at {target} unhealthy: service {args.service!r} is {status}", file=sys.stderr)
        return 1
    print(f"ckptd at {target}: {status}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
