"""The checkpoint checksum: one definition for the daemon that writes it and every reader.

xxh3_128 (hex digest) over every tensor in table order. Each tensor contributes its framing
— ``u32 len + name UTF-8``, ``u32 len + dtype name`` (the dtype table's name, e.g.
``"bfloat16"``), ``u32 ndim``, ``u64`` per dimension, ``u64 nbytes``, all little-endian —
then its C-order bytes, so that no two different tables hash the same byte stream. The
framing is documented in the proto (``RestoreHeader.checksum``) for clients in other
languages.

The daemon's store writes it into every manifest and verifies it before it restores;
``ckptd.protos.streams`` recomputes it while a restore stream is copied in, so the client
and the CLI check what they received end to end without a second pass over the bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence

import numpy as np
import xxhash


class TensorsChecksum:
    """The checksum built incrementally: ``begin`` each tensor, ``update`` with its bytes."""

    def __init__(self) -> None:
        self._digest = xxhash.xxh3_128()

    def begin(self, name: str, dtype: str, shape: Sequence[int], nbytes: int) -> None:
        """Starts a tensor: its framing, before any of its ``nbytes`` bytes."""
        encoded = name.encode("utf-8")
        dtype_name = dtype.encode("ascii")
        self._digest.update(
            struct.pack("<I", len(encoded)) + encoded
            + struct.pack("<I", len(dtype_name)) + dtype_name
            + struct.pack(f"<I{len(shape)}Q", len(shape), *shape)
            + struct.pack("<Q", nbytes)
        )

    def update(self, data: bytes | memoryview) -> None:
        """Adds the next bytes of the current tensor."""
        self._digest.update(data)

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


def tensors_checksum(tensors: Iterable[tuple[str, str, Sequence[int], np.ndarray]]) -> str:
    """The checksum of ``(name, dtype name, shape, array)`` tensors, in order."""
    checksum = TensorsChecksum()
    for name, dtype, shape, array in tensors:
        flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        checksum.begin(name, dtype, shape, flat.nbytes)
        checksum.update(flat.data)
    return checksum.hexdigest()
