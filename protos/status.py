"""The error half of the wire contract: one rich status per failed call, built and read here.

The daemon ends every failed call with the standard rich status (``google.rpc.Status`` in
the ``grpc-status-details-bin`` trailer) holding one ``google.rpc.ErrorInfo`` whose
``domain`` is ``ERROR_DOMAIN`` and whose ``reason`` names an ``ErrorReason`` value of the
proto. ``rich_status`` builds it (daemon side); ``reason_of`` reads it back (client and
CLI side), so the encoding lives in exactly one module and neither side parses messages.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

ERROR_DOMAIN = "ckptd.v1"


@dataclass(frozen=True)
class WireError:
    """What a failed call says: its status code, ckptd reason and message.

    Attributes:
        code: The gRPC status code.
        reason: The ``ErrorReason`` name the daemon sent ("ERROR_REASON_BUSY"), or "" when
            the status carries no ckptd ``ErrorInfo`` (it came from gRPC itself).
        details: The status message, verbatim.
        metadata: The ``ErrorInfo`` metadata (the request's "run", "rank", "step").
    """

    code: grpc.StatusCode
    reason: str
    details: str
    metadata: Mapping[str, str] = field(default_factory=dict)


def rich_status(
    code: grpc.StatusCode, reason: str, message: str, metadata: Mapping[str, str]
) -> grpc.Status:
    """The ``grpc.Status`` to abort a call with (``context.abort_with_status``)."""
    info = error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN, metadata=metadata)
    detail = any_pb2.Any()
    detail.Pack(info)
    status = status_pb2.Status(code=code.value[0], message=message, details=[detail])
    return rpc_status.to_status(status)


def reason_of(exc: grpc.RpcError) -> WireError:
    """Reads the code, reason and message of a failed call (``exc`` as gRPC raised it).

    An ``RpcError`` that is not a ``grpc.Call`` (no status at all) reads as UNKNOWN; a
    status without a decodable ckptd ``ErrorInfo`` has an empty ``reason``.
    """
    code = _call(exc, "code")
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN
    details = _call(exc, "details") or str(exc) or "no details"
    for info in _error_infos(exc):
        if info.domain == ERROR_DOMAIN and info.reason:
            return WireError(code, info.reason, details, dict(info.metadata))
    return WireError(code, "", details)


def _error_infos(exc: grpc.RpcError) -> list[error_details_pb2.ErrorInfo]:
    if not callable(getattr(exc, "trailing_metadata", None)):
        return []
    try:
        # from_call checks that the trailer's code and message match the call's.
        status = rpc_status.from_call(exc)
    except (ValueError, TypeError):  # a malformed or inconsistent trailer: no reason
        return []
    infos = []
    for detail in status.details if status is not None else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Is(info.DESCRIPTOR) and detail.Unpack(info):
            infos.append(info)
    return infos


def _call(exc: grpc.RpcError, method: str) -> Any:
    # A failed call's RpcError is also a grpc.Call; other RpcErrors lack these methods.
    fn = getattr(exc, method, None)
    return fn() if callable(fn) else None
