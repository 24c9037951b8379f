"""Byte layouts of the zstd symbol coder, and their decoding straight to float32 values.

Two ways to lay out a chunk's symbols, both zstd level 1 over symbols packed whole into
bytes (``packing``):

* ``packed``: one frame of the packed symbols.
* ``split``: ``u32 n`` + a frame (n bytes) of the zero/non-zero bitmap (1 bit per symbol,
  first symbol in the lowest bit), then a frame of the non-zero symbols, packed. After
  priority promotion most symbols are often 0; zstd handles those runs poorly when they are
  interleaved with the rest (at p0 = 0.86 and b = 3: 1.19 bits/symbol packed, 0.84 split),
  while at p0 <= 0.5 the two tie.

Which one wins depends on more than p0 (runs, the other symbols' spread), so the
``adaptive`` layout (coder parameter 2) tries both per chunk and keeps the smaller: whole
chunks up to ``FULL_TRIAL_ELEMS`` symbols, a ``TRIAL_ELEMS`` prefix of larger ones (about a
quarter more zstd work). Its chunk body is ``u8 mode`` (0 packed, 1 split) + the layout,
with bare frames (``zstdio``), and the split stream holds the symbols themselves (1..2^b-1).
On the digits deltas at b = 3 this is 1.3% smaller than the original per-blob choice.

The original layouts (parameter 0 = packed, 1 = split, one for the whole blob, standard
frames, split stream holding symbol - 1) are still decoded.

Decoding never materializes symbols: ``packing.ValueTable`` turns packed bytes into the
symbols' float32 values with one ``np.take``, and the split layout places the non-zero
values by index into a buffer of -0.0 (a boolean-mask scatter costs ~10x more).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from . import packing, zstdio
from .chunks import Scratch
from .format import CodecError, Reader

LEGACY_PACKED = 0
LEGACY_SPLIT = 1
ADAPTIVE = 2
LAYOUTS = (LEGACY_PACKED, LEGACY_SPLIT, ADAPTIVE)
_MODE_PACKED = b"\x00"
_MODE_SPLIT = b"\x01"
FULL_TRIAL_ELEMS = 1 << 16
TRIAL_ELEMS = 1 << 15
_F32 = np.dtype(np.float32)

Decompress = Callable[[memoryview, int, Scratch], bytes]
ChunkDecoder = Callable[[memoryview, int, Scratch], np.ndarray]


def encode_adaptive(symbols: np.ndarray, bits: int, scratch: Scratch) -> bytes:
    """Adaptive-layout body of one chunk: the smaller of packed and split."""
    if symbols.size <= FULL_TRIAL_ELEMS:
        return min(_packed_body(symbols, bits, scratch), _split_body(symbols, bits, scratch),
                   key=len)
    sample = symbols[:TRIAL_ELEMS]
    if len(_split_body(sample, bits, scratch)) < len(_packed_body(sample, bits, scratch)):
        return _split_body(symbols, bits, scratch)
    return _packed_body(symbols, bits, scratch)


def _packed_body(symbols: np.ndarray, bits: int, scratch: Scratch) -> bytes:
    return _MODE_PACKED + zstdio.compress_bare(packing.pack(symbols, bits, scratch), scratch)


def _split_body(symbols: np.ndarray, bits: int, scratch: Scratch) -> bytes:
    bitmap, values = packing.split(symbols, bits, scratch)
    bitmap_frame = zstdio.compress_bare(bitmap, scratch)
    rest = zstdio.compress_bare(values, scratch)
    return b"".join([_MODE_SPLIT, len(bitmap_frame).to_bytes(4, "little"), bitmap_frame, rest])


def chunk_decoder(layout: int, bits: int, reps: np.ndarray) -> ChunkDecoder:
    """``(body, symbol count, scratch) -> reps[symbols]`` for chunks of this layout."""
    table = packing.ValueTable.build(reps, bits)
    if layout == ADAPTIVE:
        nonzero: list[packing.ValueTable] = []  # built on the first split chunk (~15 us)

        def split_table() -> packing.ValueTable:
            if not nonzero:
                nonzero.append(packing.ValueTable.build(reps, bits, lo=1))
            return nonzero[0]

        return lambda body, n, scratch: _adaptive(body, n, table, split_table, scratch)
    if layout == LEGACY_PACKED:
        return lambda body, n, scratch: _values(
            _stream(body, packing.packed_size(bits, n), zstdio.decompress, scratch), n,
            table, scratch)
    shifted = packing.ValueTable.build(reps[1:], bits)  # the stream holds symbol - 1
    return lambda body, n, scratch: split_values(
        *_split_streams(body, n, bits, zstdio.decompress, scratch), n, shifted, scratch)


def adaptive_streams(body: memoryview, n: int, bits: int,
                     scratch: Scratch) -> tuple[np.ndarray | None, np.ndarray]:
    """The entropy-decoded streams of an adaptive chunk of ``n`` symbols: ``(None, packed
    symbols)`` in packed mode, ``(bitmap, packed non-zero symbols)`` in split mode. The
    symbols are not range-checked here (their consumer does it). They may live in
    ``scratch``."""
    if not len(body):
        raise CodecError("corrupt blob: empty chunk body")
    if body[0] == _MODE_PACKED[0]:
        return None, _stream(body[1:], packing.packed_size(bits, n), zstdio.decompress_bare,
                             scratch)
    if body[0] == _MODE_SPLIT[0]:
        return _split_streams(body[1:], n, bits, zstdio.decompress_bare, scratch)
    raise CodecError(f"corrupt blob: chunk layout mode {body[0]}, expected 0 or 1")


def _adaptive(body: memoryview, n: int, table: packing.ValueTable,
              split_table: Callable[[], packing.ValueTable], scratch: Scratch) -> np.ndarray:
    bitmap, packed = adaptive_streams(body, n, table.bits, scratch)
    if bitmap is None:
        return _values(packed, n, table, scratch)
    return split_values(bitmap, packed, n, split_table(), scratch)


def _stream(frame: memoryview, size: int, decompress: Decompress,
            scratch: Scratch) -> np.ndarray:
    return np.frombuffer(decompress(frame, size, scratch), np.uint8)


def _split_streams(body: memoryview, n: int, bits: int, decompress: Decompress,
                   scratch: Scratch) -> tuple[np.ndarray, np.ndarray]:
    """(bitmap, packed non-zero symbols) of a split body of ``n`` symbols."""
    reader = Reader(body)
    frame = reader.take(reader.u32("bitmap length"), "bitmap")
    bitmap = _stream(frame, -(-n // 8), decompress, scratch)
    ones = _ones(bitmap, n)
    return bitmap, _stream(body[reader.pos:], packing.packed_size(bits, ones), decompress,
                           scratch)


def _ones(bitmap: np.ndarray, n: int) -> int:
    """How many of the first ``n`` bits of ``bitmap`` (first bit lowest) are set."""
    whole, rem = divmod(n, 8)
    ones = int(np.bitwise_count(bitmap[:whole]).sum(dtype=np.int64))
    return ones + (int(bitmap[whole] & ((1 << rem) - 1)).bit_count() if rem else 0)


def _values(packed: np.ndarray, n: int, table: packing.ValueTable, scratch: Scratch,
            name: str = "contrib") -> np.ndarray:
    """Values of the ``n`` symbols packed in ``packed``; checks every symbol's range."""
    if not table.valid(packed, n, scratch):
        raise CodecError(f"corrupt blob: a symbol outside {table.lo}..{table.hi - 1} "
                         f"(b = {table.bits})")
    return table.lookup(packed, n, scratch, name)


def split_values(bitmap: np.ndarray, nonzero: np.ndarray, n: int, table: packing.ValueTable,
             scratch: Scratch) -> np.ndarray:
    """The float32 values of a split chunk's ``n`` symbols (in ``scratch``): -0.0 (symbol 0)
    where ``bitmap`` is clear, else the next of ``nonzero`` (``table`` checks them)."""
    index = np.flatnonzero(np.unpackbits(bitmap, count=n, bitorder="little").view(np.bool_))
    values = _values(nonzero, index.size, table, scratch, "split_values")
    contrib = scratch.get("contrib", n, _F32)
    contrib.fill(-0.0)  # symbol 0 adds -0.0: x + (-0.0) == x bit for bit
    contrib[index] = values
    return contrib
