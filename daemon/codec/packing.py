"""Packing of b-bit symbols into bytes, the input of the default (zstd) symbol coder.

Symbols are packed whole into bytes, never straddling one: 8 per byte for b = 1, 4 for b = 2,
2 (nibbles) for b = 3..4, 1 for b >= 5. Byte-aligned fields keep zstd's byte-oriented
matcher and literal statistics effective: on a Gaussian-like delta at b = 3 (entropy 1.96
bits/symbol) zstd-1 reaches 2.01 bits/symbol on nibbles, 2.49 on straddling 3-bit fields and
2.60 on one symbol per byte.

Within a byte the first symbol takes the least significant bits. Packing works on whole
machine words (``s | s >> 4`` over uint16 pairs), about ten times faster than strided lanes.
"""

from __future__ import annotations

import numpy as np

from .chunks import Scratch


def per_byte(bits: int) -> int:
    """How many symbols of ``bits`` bits share one byte."""
    if bits == 1:
        return 8
    if bits == 2:
        return 4
    return 2 if bits <= 4 else 1


def _unpack_tables() -> dict[int, np.ndarray]:
    """byte -> its symbols, one little-endian word per byte value (2 and 4 per byte)."""
    byte = np.arange(256, dtype=np.uint32)
    nibbles = (byte & 0xF) | ((byte >> 4) << 8)
    crumbs = sum(((byte >> (2 * i)) & 3) << (8 * i) for i in range(4))
    return {2: nibbles.astype("<u2"), 4: np.asarray(crumbs).astype("<u4")}


_UNPACK = _unpack_tables()


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


def unpack(packed: np.ndarray, bits: int, n: int, scratch: Scratch) -> np.ndarray:
    """Inverse of ``pack``: the first ``n`` symbols held in ``packed`` (uint8)."""
    k = per_byte(bits)
    if k == 1:
        return packed[:n]
    if k == 8:
        return np.unpackbits(packed, count=n, bitorder="little")
    table = _UNPACK[k]
    words = np.take(table, packed, out=scratch.get(f"unpack{k}", packed.size, table.dtype))
    return words.view(np.uint8)[:n]


def packed_size(bits: int, n: int) -> int:
    """Bytes that ``pack`` produces for ``n`` symbols."""
    return -(-n // per_byte(bits))
