"""Assembling a restore stream into torch tensors and the saved structure.

The daemon sends one header (tensor table, metadata, checksum) and then every tensor's
bytes in table order; ``ckptd.protos.streams`` checks the framing. Each tensor is allocated
once in its final dtype and shape and its chunks are copied straight into it (bfloat16
through its raw 16-bit words), so a restore costs one copy on the client. A stream that
skips, repeats or truncates bytes raises ``CorruptCheckpointError``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from ckptd.protos import dtypes, streams
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


def _allocate_into(tensors: list[torch.Tensor]) -> streams.Allocate:
    """An allocator for ``streams.receive`` that keeps each torch tensor it makes."""

    def allocate(spec: pb.TensorSpec) -> np.ndarray:
        try:
            row = dtypes.from_wire(spec.dtype)
        except ValueError as exc:
            raise CorruptCheckpointError(f"tensor {spec.name!r}: {exc}") from None
        shape = tuple(int(d) for d in spec.shape)
        tensor = torch.empty(shape, dtype=getattr(torch, row.torch_name))
        tensors.append(tensor)
        return tensor.reshape(-1).view(torch.uint8).numpy()

    return allocate


def receive(
    replies: Iterator[pb.RestoreResponse], map_location: str | torch.device = "cpu"
) -> RestoredState:
    """Consumes a Restore stream and rebuilds the saved state.

    States saved by this client come back in their original structure; a checkpoint
    without ``ckptd.structure`` (written by another client) comes back as a flat
    ``{name: tensor}`` dict.
    """
    tensors: list[torch.Tensor] = []
    try:
        header = streams.receive(replies, _allocate_into(tensors))
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
    return RestoredState(int(header.ref.step), state, metadata, header.checksum)
