"""The explicit dtype table of the wire format, shared by client and daemon.

Each row ties the protobuf ``DType`` value to a stable name (used in manifests), the numpy
dtype that holds the raw bytes, and the element size. bfloat16 has no numpy dtype: its raw
16-bit words travel and are stored as ``uint16``, and ``is_bfloat16`` says how to read them.
Never derive these from ``str(dtype)``: the table is the contract.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DTypeInfo:
    """One row of the dtype table."""

    wire: int  # ckptd.v1.DType value
    name: str  # stable name, written in manifests and shown to users
    numpy: np.dtype  # holder of the raw bytes (little-endian)
    torch_name: str  # attribute of the ``torch`` module, resolved by the client only

    @property
    def itemsize(self) -> int:
        return self.numpy.itemsize

    @property
    def is_float(self) -> bool:
        return self.name in ("float32", "float16", "bfloat16", "float64")

    @property
    def is_bfloat16(self) -> bool:
        return self.name == "bfloat16"


_ROWS = (
    DTypeInfo(1, "float32", np.dtype("<f4"), "float32"),
    DTypeInfo(2, "float16", np.dtype("<f2"), "float16"),
    DTypeInfo(3, "bfloat16", np.dtype("<u2"), "bfloat16"),
    DTypeInfo(4, "float64", np.dtype("<f8"), "float64"),
    DTypeInfo(5, "int8", np.dtype("i1"), "int8"),
    DTypeInfo(6, "int16", np.dtype("<i2"), "int16"),
    DTypeInfo(7, "int32", np.dtype("<i4"), "int32"),
    DTypeInfo(8, "int64", np.dtype("<i8"), "int64"),
    DTypeInfo(9, "uint8", np.dtype("u1"), "uint8"),
    DTypeInfo(10, "bool", np.dtype("?"), "bool"),
    DTypeInfo(11, "uint16", np.dtype("<u2"), "uint16"),
    DTypeInfo(12, "uint32", np.dtype("<u4"), "uint32"),
    DTypeInfo(13, "uint64", np.dtype("<u8"), "uint64"),
)

BY_WIRE: dict[int, DTypeInfo] = {row.wire: row for row in _ROWS}
BY_NAME: dict[str, DTypeInfo] = {row.name: row for row in _ROWS}


def from_wire(value: int) -> DTypeInfo:
    """Looks up a protobuf ``DType`` value; raises ``ValueError`` naming it when unknown."""
    try:
        return BY_WIRE[value]
    except KeyError:
        known = ", ".join(sorted(BY_NAME))
        raise ValueError(f"unknown dtype value {value}; supported: {known}") from None


def from_name(name: str) -> DTypeInfo:
    """Looks up a dtype by its table name; raises ``ValueError`` naming it when unknown."""
    try:
        return BY_NAME[name]
    except KeyError:
        known = ", ".join(sorted(BY_NAME))
        raise ValueError(f"unknown dtype {name!r}; supported: {known}") from None
