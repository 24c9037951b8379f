"""Packing of b-bit symbols into bytes, the input of the default (zstd) symbol coder.

Symbols are packed whole into bytes, never straddling one: 8 per byte for b = 1, 4 for b = 2,
2 (nibbles) for b = 3..4, 1 for b >= 5. Byte-aligned fields keep zstd's byte-oriented
matcher and literal statistics effective: on a Gaussian-like delta at b = 3 (entropy 1.96
bits/symbol) zstd-1 reaches 2.01 bits/symbol on nibbles, 2.49 on straddling 3-bit fields and
2.60 on one symbol per byte.

Within a byte the first symbol takes the least significant bits. Packing works on whole
machine words (``s | s >> 4`` over uint16 pairs), about ten times faster than strided lanes.

Decoding never unpacks: ``ValueTable`` maps each of the 256 byte values to the float32 values
of the symbols it holds (one 4k-byte item), so one ``np.take`` over the packed bytes yields
the per-element contributions directly. That reads ``k`` times fewer indices than a take
per symbol (numpy widens every index to intp first) and skips the symbol array entirely.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import kernels
from .chunks import Scratch


def per_byte(bits: int) -> int:
    """How many symbols of ``bits`` bits share one byte."""
    if bits == 1:
        return 8
    if bits == 2:
        return 4
    return 2 if bits <= 4 else 1


def pack(symbols: np.ndarray, bits: int, scratch: Scratch) -> np.ndarray:
    """Packs uint8 symbols (each < 2^bits) into ceil(n / per_byte) bytes.

    The result may live in ``scratch`` (or be ``symbols`` itself for b >= 5).
    """
    k = per_byte(bits)
    if k == 1:
        return symbols
    if k == 8:
        return np.packbits(symbols, bitorder="little")
    whole = symbols.size - symbols.size % k
    out = scratch.get("packed", -(-symbols.size // k), np.uint8)
    word_type = np.dtype("<u2") if k == 2 else np.dtype("<u4")
    words = symbols[:whole].view(word_type)
    tmp = scratch.get(f"pack{k}", words.size, word_type)
    np.right_shift(words, 4 if k == 2 else 6, out=tmp)
    np.bitwise_or(tmp, words, out=tmp)
    if k == 4:  # bits 16..19 hold symbols 2 and 3: bring them down to bits 4..7
        np.bitwise_or(tmp, tmp >> 12, out=tmp)
    np.copyto(out[: words.size], tmp, casting="unsafe")
    if whole < symbols.size:
        shifts = np.arange(symbols.size - whole, dtype=np.uint8) * (8 // k)
        out[-1] = np.bitwise_or.reduce(symbols[whole:] << shifts)
    return out


def split(symbols: np.ndarray, bits: int, scratch: Scratch) -> tuple[np.ndarray, np.ndarray]:
    """``(bitmap, packed non-zero symbols)``: ``np.packbits(symbols != 0, bitorder="little")``
    and ``pack(symbols[symbols != 0], bits)``, byte for byte, the selection in one compiled
    pass (``kernels.split_symbols``). Both may live in ``scratch``."""
    n = symbols.size
    bitmap = scratch.get("split_bitmap", -(-n // 8), np.uint8)
    nonzero = scratch.get("split_nonzero", n, np.uint8)
    count = kernels.split_symbols(symbols, bitmap, nonzero)
    return bitmap, pack(nonzero[:count], bits, scratch)


def _field_width(bits: int) -> int:
    """Bits per field of a packed byte (a symbol occupies the low ``bits`` of its field)."""
    return 8 // per_byte(bits)


def _fields(bits: int) -> np.ndarray:
    """(256, k) table: the k field values of every byte value, first symbol first."""
    width = _field_width(bits)
    shifts = width * np.arange(per_byte(bits))
    return (np.arange(256)[:, None] >> shifts) & ((1 << width) - 1)


@dataclass(frozen=True)
class ValueTable:
    """byte -> float32 values of its ``k`` symbols, and which bytes hold an invalid symbol.

    Built once per blob (256 x k entries): ``values[s]`` is the value of symbol ``s`` for
    ``lo <= s < values.size``; a symbol outside that range makes the blob corrupt.
    """

    bits: int
    items: np.ndarray  # (256,) of dtype V{4k}: the k float32 values of each byte value
    bad: np.ndarray  # (256,) bool: some field of this byte is an invalid symbol
    fields: np.ndarray  # (256, k) the field values (for the partial last byte)
    lo: int
    hi: int  # valid symbols are lo..hi - 1

    @classmethod
    def build(cls, values: np.ndarray, bits: int, lo: int = 0) -> ValueTable:
        """Table for symbols ``lo .. values.size - 1`` of ``bits`` bits."""
        k = per_byte(bits)
        fields = _fields(bits)
        padded = np.zeros(1 << _field_width(bits), np.float32)
        padded[:values.size] = values
        items = np.ascontiguousarray(padded[fields]).view(np.dtype(f"V{4 * k}")).reshape(256)
        bad = np.asarray(((fields < lo) | (fields >= values.size)).any(axis=1))
        return cls(bits, items, bad, fields, lo, values.size)

    def lookup(self, packed: np.ndarray, n: int, scratch: Scratch, name: str) -> np.ndarray:
        """float32 values of the first ``n`` symbols packed in ``packed`` (in ``scratch``)."""
        k = per_byte(self.bits)
        out = scratch.get(name, k * packed.size, np.float32)
        np.take(self.items, packed, out=out.view(self.items.dtype), mode="clip")
        return out[:n]

    def valid(self, packed: np.ndarray, n: int, scratch: Scratch) -> bool:
        """Whether the first ``n`` symbols in ``packed`` are all in ``lo .. hi - 1``.

        When only symbols >= 2^b are invalid one OR-reduction settles it; otherwise (a
        stream that may not hold 0) the ``bad`` table is looked up for every byte.
        """
        k = per_byte(self.bits)
        whole, rem = divmod(n, k)
        if rem and not self._valid_fields(self.fields[packed[whole], :rem]):
            return False
        body = packed[:whole]
        if self.lo == 0 and self.hi == 1 << self.bits:
            high = _high_bits(self.bits)
            return not (high and body.size and int(np.bitwise_or.reduce(body)) & high)
        flags = np.take(self.bad, body, out=scratch.get("bad_fields", body.size, np.bool_),
                        mode="clip")
        return not flags.any()

    def _valid_fields(self, fields: np.ndarray) -> bool:
        return bool(((fields >= self.lo) & (fields < self.hi)).all())


def _high_bits(bits: int) -> int:
    """The bits of a packed byte that no symbol below 2^bits sets."""
    width = _field_width(bits)
    used = sum(((1 << bits) - 1) << (width * i) for i in range(per_byte(bits)))
    return 0xFF & ~used


def packed_size(bits: int, n: int) -> int:
    """Bytes that ``pack`` produces for ``n`` symbols."""
    return -(-n // per_byte(bits))
