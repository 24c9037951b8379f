"""Which transport a checkpointer's saves use, chosen once against the daemon's answer.

``Checkpointer(transport=...)`` asks for ``"grpc"``, ``"shm"`` or ``"auto"``; whether
shared memory can work depends on facts only the connected daemon reports
(``ServerInfo.shared_memory``, its hostname and boot id) and on the target (the daemon
serves shared memory only over its unix socket, whose peer uid it can read). An explicit
``"shm"`` that cannot work is refused at construction with what to use instead; ``"auto"``
takes shared memory where it should work and keeps a streaming fallback for a daemon that
then refuses the segment (e.g. it runs in another container). Restores follow the choice.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from ckptd.protos.v1 import pb

from .grpc_transport import Connection, StreamTransport, chunk_bytes_for
from .shm import ShmTransport, is_unix_target, same_host
from .transport import SaveTransport

__all__ = ["choose_transport"]


def choose_transport(
    mode: str, target: str, connection: Connection, info: pb.ServerInfo
) -> tuple[SaveTransport, Callable[[], SaveTransport] | None]:
    """The transport for ``mode`` and the fallback to stream with (None: none).

    Raises:
        ValueError: ``mode`` is ``"shm"`` but the daemon or the target cannot serve it.
    """
    pin = torch.cuda.is_available()

    def stream() -> SaveTransport:
        return StreamTransport(connection, chunk_bytes_for(info), pin_memory=pin)

    if mode == "grpc":
        return stream(), None
    if mode == "shm":
        if not info.shared_memory:
            raise ValueError(
                f"transport='shm' but the daemon at {target!r} does not accept shared "
                "memory (its ServerInfo.shared_memory is false); use transport='grpc' or 'auto'"
            )
        if not is_unix_target(target):
            raise ValueError(
                f"transport='shm' needs the daemon's unix socket (unix:///path), got "
                f"{target!r}: the daemon serves shared memory only to clients whose "
                "uid it can read off the socket; use transport='grpc' or 'auto' over TCP"
            )
        return ShmTransport(connection, pin_memory=pin), None
    local = is_unix_target(target) and same_host(info.hostname, info.boot_id)
    if info.shared_memory and local:
        return ShmTransport(connection, pin_memory=pin), stream
    return stream(), None
