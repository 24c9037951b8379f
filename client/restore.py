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
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from ckptd.protos import dtypes, streams
from ckptd.protos.v1 import pb

from .errors import CorruptCheckpointError, SharedMemoryRefusedError
from .grpc_transport import Connection
from .shm import RestoreSegment
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
    return RestoredState(int(header.ref.step), state, metadata, header.checksum, transport)


def restore_state(
    connection: Connection,
    request: pb.RestoreRequest,
    map_location: str | torch.device,
    *,
    shared_memory: bool,
    fallback: bool,
    zero_copy: bool = False,
) -> RestoredState:
    """Runs ``request`` through the daemon's shared memory when ``shared_memory`` (same
    host, unix socket), else as a stream; with ``fallback``, a daemon that refuses the
    segment (``SharedMemoryRefusedError``) is asked again for a stream. The segment is
    unlinked on every path; with ``zero_copy`` its memory lives on in the returned
    tensors, which are views of it."""
    if shared_memory:
        with RestoreSegment() as segment:
            ref = segment.reference
            if ref is not None:
                named = pb.RestoreRequest()
                named.CopyFrom(request)
                named.shared_memory.segment_name = ref.name
                try:
                    return connection.restore(
                        named, lambda replies: receive(replies, map_location, ref,
                                                       zero_copy=zero_copy))
                except SharedMemoryRefusedError as exc:
                    if not fallback:
                        raise
                    logger.warning("restore through shared memory refused, streaming: %s", exc)
    return connection.restore(request, lambda replies: receive(replies, map_location))
