"""Assembling a restore stream into torch tensors and the saved structure.

The daemon sends one header (tensor table, metadata, checksum) and then every tensor's
bytes in table order. Each tensor is allocated once in its final dtype and shape and its
chunks are copied straight into it (bfloat16 through its raw 16-bit words), so a restore
costs one copy on the client. Ordering and byte counts are checked: a stream that skips,
repeats or truncates bytes raises ``CorruptCheckpointError`` rather than returning garbage.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from ckptd.protos import dtypes
from ckptd.protos.v1 import pb

from .errors import CorruptCheckpointError
from .structure import STRUCTURE_KEY, unflatten


@dataclass(frozen=True)
class RestoredState:
    """A restored checkpoint: which step it is and the state as it was saved."""

    step: int
    state: Any
    metadata: Mapping[str, str]
    checksum: str


class _Receiver:
    """Destination buffers of one restore and the position of the next expected chunk."""

    def __init__(self, header: pb.RestoreHeader) -> None:
        self.specs = list(header.tensors)
        self.tensors = [_allocate(spec) for spec in self.specs]
        self._bytes = [_byte_view(t) for t in self.tensors]
        self._filled = [0] * len(self.specs)
        self._index = 0

    def write(self, chunk: pb.TensorChunk) -> None:
        index, offset, data = chunk.tensor_index, chunk.offset, chunk.data
        self._skip_complete()
        if index != self._index or index >= len(self.specs) or offset != self._filled[index]:
            expected = (
                f"tensor {self._index} offset {self._filled[self._index]}"
                if self._index < len(self.specs)
                else "no more chunks"
            )
            raise CorruptCheckpointError(
                f"restore stream out of order: got tensor {index} offset {offset}, "
                f"expected {expected}"
            )
        end = offset + len(data)
        spec = self.specs[index]
        if end > spec.nbytes:
            raise CorruptCheckpointError(
                f"restore stream overruns tensor {spec.name!r}: {end} bytes of {spec.nbytes}"
            )
        self._bytes[index][offset:end] = np.frombuffer(data, dtype=np.uint8)
        self._filled[index] = end

    def finish(self) -> list[torch.Tensor]:
        for spec, filled in zip(self.specs, self._filled, strict=True):
            if filled != spec.nbytes:
                raise CorruptCheckpointError(
                    f"restore stream ended early: tensor {spec.name!r} has {filled} "
                    f"of {spec.nbytes} bytes"
                )
        return self.tensors

    def _skip_complete(self) -> None:
        while (
            self._index < len(self.specs)
            and self._filled[self._index] == self.specs[self._index].nbytes
        ):
            self._index += 1


def _allocate(spec: pb.TensorSpec) -> torch.Tensor:
    row = dtypes.from_wire(spec.dtype)
    shape = tuple(int(d) for d in spec.shape)
    expected = math.prod(shape) * row.itemsize
    if spec.nbytes != expected:
        raise CorruptCheckpointError(
            f"tensor {spec.name!r}: the daemon announced {spec.nbytes} bytes but shape {shape} "
            f"of {row.name} holds {expected}"
        )
    return torch.empty(shape, dtype=getattr(torch, row.torch_name))


def _byte_view(tensor: torch.Tensor) -> np.ndarray:
    return tensor.reshape(-1).view(torch.uint8).numpy()


def receive(
    replies: Iterator[pb.RestoreReply], map_location: str | torch.device = "cpu"
) -> RestoredState:
    """Consumes a Restore stream and rebuilds the saved state.

    States saved by this client come back in their original structure; a checkpoint
    without ``ckptd.structure`` (written by another client) comes back as a flat
    ``{name: tensor}`` dict.
    """
    first = next(replies, None)
    if first is None or first.WhichOneof("item") != "header":
        raise CorruptCheckpointError("restore stream did not start with a header")
    header = first.header
    receiver = _Receiver(header)
    for reply in replies:
        if reply.WhichOneof("item") != "chunk":
            raise CorruptCheckpointError("restore stream sent a second header")
        receiver.write(reply.chunk)
    tensors = receiver.finish()
    device = torch.device(map_location)
    if device.type != "cpu":
        tensors = [t.to(device) for t in tensors]
    by_name = {spec.name: t for spec, t in zip(receiver.specs, tensors, strict=True)}
    metadata = dict(header.metadata)
    structure = metadata.get(STRUCTURE_KEY)
    state = unflatten(structure, by_name) if structure is not None else by_name
    return RestoredState(int(header.ref.step), state, metadata, header.checksum)
