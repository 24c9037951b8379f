"""The ckptd wire contract shared by client and daemon.

* ``ckptd.protos.v1`` — the generated protobuf (``pb``) and gRPC (``pb_grpc``) modules of
  ``ckptd/v1/ckptd.proto``; importing it imports ``grpc``.
* ``ckptd.protos.dtypes`` — the explicit dtype table; numpy only, safe for the engine.
* ``ckptd.protos.segments`` — client shared-memory segment names and the lock that tells a
  live segment from an orphan; stdlib only.
* ``ckptd.protos.status`` — the error half of the contract: builds and reads the rich status
  (``google.rpc.ErrorInfo`` with an ``ErrorReason``) of a failed call; imports ``grpc``.
* ``ckptd.protos.streams`` — reassembles a Restore stream into caller-allocated buffers;
  numpy and the generated messages only.

This package's ``__init__`` imports nothing, so the transport-free parts of the daemon can
use the dtype table without pulling in gRPC.
"""

API_VERSION = "ckptd.v1"


def installed_version() -> str:
    """The installed ckptd distribution's version (``"0+unknown"`` run from a source tree
    that is not installed): what the daemon reports and ``ckptd info`` names for the
    client library. ``importlib.metadata`` is imported here, so importing the package
    still imports nothing."""
    from importlib import metadata

    try:
        return metadata.version("ckptd")
    except metadata.PackageNotFoundError:
        return "0+unknown"
