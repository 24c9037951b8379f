"""The transport seam: how a staged snapshot's bytes reach the daemon.

Everything except the bytes of a save — restore, listing, waiting for durability — goes
over the same gRPC ``Connection``. Transports differ only in where the snapshot lives and
how the daemon gets at it:

* ``StreamTransport`` (``grpc_transport``): ordinary host memory, streamed in chunks of at
  most the daemon's ``max_chunk_bytes``; works for any placement.
* ``ShmTransport`` (``shm``): a POSIX shared-memory segment on the daemon's host; only the
  header is sent and the daemon copies the bytes out before it answers ACCEPTED.

Call order: the checkpointer calls ``allocate`` (through the staging pool, trainer thread)
to create staging buffers, then ``send`` once per save from its single sender thread, in
step order. ``send`` returns the daemon's ACCEPTED status or raises a ``CkptdClientError``
already mapped from the gRPC status; ``Connection.save`` has already resent the snapshot
while the daemon restarted (up to ``reconnect_timeout_s``, see ``retry.py``).
"""

from __future__ import annotations

import abc

from ckptd.protos.v1 import pb

from .staging import Layout, StagingBuffer


class SaveTransport(abc.ABC):
    """Carries one snapshot to the daemon; stateless between saves apart from buffers."""

    name: str = ""

    @abc.abstractmethod
    def allocate(self, capacity: int) -> StagingBuffer:
        """Creates a staging buffer of ``capacity`` bytes this transport can send."""

    @abc.abstractmethod
    def send(self, header: pb.SaveHeader, buffer: StagingBuffer, layout: Layout) -> pb.SaveStatus:
        """Hands over the snapshot in ``buffer`` (tensors at ``layout``); returns once the
        daemon ACCEPTED it.

        Raises:
            CkptdClientError: The daemon refused or could not be reached (mapped status).
        """

    def accepts(self, buffer: StagingBuffer) -> bool:
        """Whether ``send`` can carry ``buffer`` (one another transport allocated); the
        default, any buffer: its bytes are in this process."""
        return True

    def cancel(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Aborts a ``send`` in progress (called from another thread by ``close``)."""
