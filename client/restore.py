"""Assembling a restore stream into torch tensors and the saved structure.

The daemon sends one header (tensor table, metadata, checksum) and then every tensor's
bytes in table order; ``ckptd.protos.streams`` checks the framing. Each tensor is allocated
once in its final dtype and shape and its chunks are copied straight into it (bfloat16
through its raw 16-bit words), so a restore costs one copy on the client. A stream that
skips, repeats or truncates bytes raises ``CorruptCheckpointError``. On the daemon's host
(``restore``), the daemon writes the step into a segment the client created instead, and the
client copies it out, hashing each block as it lands, or, with ``zero_copy``, maps it,
hashes each batch as it is announced and returns views of the mapping (no copy on the
client; the mapping lives as long as the tensors): never unverified bytes. Meanwhile a
second thread (``sidecar.py``, joined before ``receive`` returns or raises) faults the
fresh tensors in ahead of the copy.

With ``transport="auto"``, a restore the daemon refuses to write into shared memory (a
``/dev/shm`` too small for the step, or a daemon that cannot open the segment) streams
instead; ``RestoreRoom`` remembers a refusal for the rest of the checkpointer's life, so
that one condition is one warning and a ``/dev/shm`` known to be too small is not asked
again on every restore.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from ckptd.protos import dtypes, segments, streams
from ckptd.protos.v1 import pb

from .errors import CorruptCheckpointError, SharedMemoryRefusedError
from .grpc_transport import Connection
from .shm import RestoreSegment, ShmRoom
from .sidecar import RestoreSidecar
from .structure import STRUCTURE_KEY, unflatten

logger = logging.getLogger("ckptd.client")


@dataclass(frozen=True)
class RestoredState:
    """A restored checkpoint: which step it is and the state as it was saved."""

    step: int
    state: Any
    metadata: Mapping[str, str]
    checksum: str
    transport: str = "grpc"
    """How the bytes came: ``"shm"`` (the daemon's shared memory) or ``"grpc"`` (streamed)."""
    nbytes: int = 0
    """What a restore of this step through shared memory needs there: its tensors' bytes,
    each at an aligned offset (``segments.aligned_offsets``, the span the daemon checks
    ``/dev/shm``'s room against)."""


# However little room /dev/shm had at the last refusal, every this many restores after it
# asks for shared memory again: a smaller step may fit where the refused one did not.
RETRY_EVERY_RESTORES = 8


class RestoreRoom:
    """Whether a checkpointer's next same-host restore asks for shared memory, from what
    its earlier restores learned (``transport="auto"`` only: ``"shm"`` raises instead):
    ``ShmRoom``'s rule (after a refusal, stream while ``/dev/shm`` has less room than the
    refused step needed, ask again once it has and every ``RETRY_EVERY_RESTORES``-th
    restore), with the restore's warning: the first refusal warns with the daemon's reason
    and what to do; refusals after it are logged at debug level until a restore goes
    through shared memory again. Used from the trainer's thread that calls ``restore``."""

    def __init__(
        self, room: Callable[[], tuple[int, int] | None] = segments.room,
    ) -> None:
        self._room = ShmRoom("restore", RETRY_EVERY_RESTORES, room)

    def worth_trying(self) -> bool:
        """Whether to ask the daemon for a segment this time (else: stream)."""
        return self._room.worth_trying()

    def refused(self, exc: SharedMemoryRefusedError, nbytes: int) -> None:
        """Records that the daemon refused a segment for a restore of ``nbytes`` bytes,
        which then streamed."""
        if not self._room.refused(nbytes):
            logger.debug("restore through shared memory refused again, streamed: %s", exc)
            return
        logger.warning(
            "restore through shared memory refused, streamed instead: %s; %s; see the "
            "README's 'Sizing /dev/shm' (a larger /dev/shm), or pass transport='grpc' to "
            "always stream (this warning is not repeated until shared memory works again)",
            exc, self._room.later())

    def served(self) -> None:
        """Records a restore that went through shared memory: the condition has ended."""
        if self._room.served():
            logger.info("restores go through shared memory again")


def _allocate_into(tensors: list[torch.Tensor], sidecar: RestoreSidecar) -> streams.Allocate:
    """An allocator for ``streams.receive`` that keeps each torch tensor it makes and hands
    it to ``sidecar``, which faults its memory in ahead of the copy (every byte is about to
    be written) from a second thread."""

    def allocate(spec: pb.TensorSpec) -> np.ndarray:
        try:
            row = dtypes.from_wire(spec.dtype)
        except ValueError as exc:
            raise CorruptCheckpointError(f"tensor {spec.name!r}: {exc}") from None
        shape = tuple(int(d) for d in spec.shape)
        tensor = torch.empty(shape, dtype=getattr(torch, row.torch_name))
        sidecar.add(tensor)
        tensors.append(tensor)
        return tensor.reshape(-1).view(torch.uint8).numpy()

    return allocate


def _adopt_into(tensors: list[torch.Tensor]) -> streams.Adopt:
    """An adopter for ``streams.receive`` that makes each view of the segment a tensor
    (no copy: the tensors share the mapping, which lives as long as any of them)."""

    def adopt(spec: pb.TensorSpec, view: np.ndarray) -> None:
        torch_dtype = getattr(torch, dtypes.from_wire(spec.dtype).torch_name)
        shape = tuple(int(d) for d in spec.shape)
        tensors.append(torch.from_numpy(view).view(torch_dtype).reshape(shape))

    return adopt


def receive(
    replies: Iterator[streams.Reply],
    map_location: str | torch.device = "cpu",
    segment: streams.Segment | None = None,
    *,
    zero_copy: bool = False,
) -> RestoredState:
    """Consumes a Restore stream (or, where the request named ``segment``, the header the
    daemon answered after writing into it) and rebuilds the saved state; with
    ``zero_copy``, the tensors of a segment are views of it instead of copies.

    States saved by this client come back in their original structure; a checkpoint
    without ``ckptd.structure`` (written by another client) comes back as a flat
    ``{name: tensor}`` dict.
    """
    tensors: list[torch.Tensor] = []
    with RestoreSidecar() as sidecar:
        try:
            header = streams.receive(replies, _allocate_into(tensors, sidecar),
                                     sidecar.copied, segment=segment,
                                     adopt=_adopt_into(tensors) if zero_copy else None)
        except streams.StreamError as exc:
            raise CorruptCheckpointError(str(exc)) from exc
    device = torch.device(map_location)
    if device.type != "cpu":
        tensors = [t.to(device) for t in tensors]
    by_name = {spec.name: t for spec, t in zip(header.tensors, tensors, strict=True)}
    metadata = dict(header.metadata)
    structure = metadata.get(STRUCTURE_KEY)
    try:
        state = unflatten(structure, by_name) if structure is not None else by_name
    except ValueError as exc:
        raise CorruptCheckpointError(
            f"step {header.ref.step}: its {STRUCTURE_KEY} metadata does not rebuild the state: "
            f"{str(exc)[:200]}"
        ) from exc
    transport = "shm" if header.HasField("shared_memory") else "grpc"
    _, nbytes = segments.aligned_offsets([int(spec.nbytes) for spec in header.tensors])
    return RestoredState(int(header.ref.step), state, metadata, header.checksum, transport,
                         nbytes)


def restore_state(
    connection: Connection,
    request: pb.RestoreRequest,
    map_location: str | torch.device,
    *,
    shared_memory: bool,
    fallback: bool,
    zero_copy: bool = False,
    room: RestoreRoom | None = None,
) -> RestoredState:
    """Runs ``request`` through the daemon's shared memory when ``shared_memory`` (same
    host, unix socket), else as a stream; with ``fallback``, a daemon that refuses the
    segment (``SharedMemoryRefusedError``) is asked again for a stream, and ``room`` (the
    checkpointer's memory of refusals) decides whether to ask for a segment at all and
    says so once. The segment is unlinked on every path; with ``zero_copy`` its memory
    lives on in the returned tensors, which are views of it."""
    room = room if room is not None else RestoreRoom()
    refusal: SharedMemoryRefusedError | None = None
    if shared_memory and (not fallback or room.worth_trying()):
        with RestoreSegment() as segment:
            ref = segment.reference
            if ref is not None:
                named = pb.RestoreRequest()
                named.CopyFrom(request)
                named.shared_memory.segment_name = ref.name
                try:
                    restored = connection.restore(
                        named, lambda replies: receive(replies, map_location, ref,
                                                       zero_copy=zero_copy))
                except SharedMemoryRefusedError as exc:
                    if not fallback:
                        raise
                    refusal = exc
                else:
                    room.served()
                    return restored
    restored = connection.restore(request, lambda replies: receive(replies, map_location))
    if refusal is not None:
        room.refused(refusal, restored.nbytes)
    return restored
