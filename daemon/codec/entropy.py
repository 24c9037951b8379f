"""Symbol coders: how a chunk's uint8 symbols become bytes, and back.

Two coders, chosen per blob and recorded in its header:

* ``zstd`` (default): symbols packed whole into bytes (``packing``), then zstd level 1, in
  one of two layouts recorded in the coder's one parameter byte:

  - ``packed`` (0): the packed symbols, one zstd frame per chunk.
  - ``split`` (1), used when at least ``SPLIT_MIN_ZERO_FRACTION`` of the symbols are 0:
    ``u32 n`` + zstd frame (n bytes) of the zero/non-zero bitmap (1 bit per symbol, first
    symbol in the lowest bit), then a zstd frame of the non-zero symbols minus one, packed.
    After priority promotion most symbols are 0, and zstd's matcher plus byte-level literal
    coding handles those runs poorly when interleaved with the rest: on Laplace-like deltas
    (p0 = 0.86, entropy 0.82 bits/symbol at b = 3) packed costs 1.19 bits/symbol, split 0.84;
    at p0 = 0.62 1.81 vs 1.69; at p0 <= 0.5 they tie and split only costs time.

* ``huffman``: the paper's canonical Huffman code (``huffman``): never below 1 bit/symbol.

Call order: ``encoder(sym_counts, bits, count)`` once per tensor (after promotion, so the
coder can look at the exact symbol counts); its ``params`` go into the blob and its
``encode`` runs once per chunk, possibly from several threads. Decoding calls ``decoder``
once with every chunk body and gets back ``(chunk index, scratch) -> symbols``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import zstandard

from . import huffman, packing
from .chunks import Scratch
from .format import CodecError, Reader

ZSTD_LEVEL = 1
SPLIT_MIN_ZERO_FRACTION = 0.6
_PACKED = 0
_SPLIT = 1


@dataclass(frozen=True)
class ChunkEncoder:
    """The per-tensor encoder: parameters to store, and ``(symbols, scratch) -> body``."""

    params: bytes
    encode: Callable[[np.ndarray, Scratch], bytes]


def encoder(coder: str, sym_counts: np.ndarray, bits: int, count: int) -> ChunkEncoder:
    """Prepares the encoder of ``coder`` for a tensor with these symbol counts."""
    if coder == "zstd":
        split = count > 0 and sym_counts[0] >= SPLIT_MIN_ZERO_FRACTION * count
        layout = _SPLIT if split else _PACKED
        return ChunkEncoder(bytes([layout]),
                            lambda symbols, scratch: _zstd_encode(symbols, bits, layout, scratch))
    code = huffman.make_code(huffman.code_lengths(sym_counts))
    block = huffman.block_size(count)
    return ChunkEncoder(huffman.encode_params(code.lengths, block),
                        lambda symbols, _: huffman.encode_chunk(symbols, code, block))


def decoder(coder: str, params: memoryview, bits: int, bodies: list[memoryview],
            sizes: list[int]) -> Callable[[int, Scratch], np.ndarray]:
    """``(chunk index, scratch) -> decoded symbols`` (uint8) for the chunks of one blob.

    The result may live in ``scratch``: use it before the next call from the same thread.
    """
    if coder == "zstd":
        if bytes(params) not in (bytes([_PACKED]), bytes([_SPLIT])):
            raise CodecError(f"corrupt blob: zstd coder parameters {bytes(params)!r}")
        layout = params[0]
        return lambda i, scratch: _zstd_decode(bodies[i], bits, sizes[i], layout, scratch)
    lengths, block = huffman.parse_params(params, bits)
    symbols_of = huffman.decoder(bodies, sizes, lengths, block)
    return lambda i, _: symbols_of(i)


def _zstd_encode(symbols: np.ndarray, bits: int, layout: int, scratch: Scratch) -> bytes:
    if layout == _PACKED:
        return zstd_compress(packing.pack(symbols, bits, scratch).data, scratch)
    nonzero = np.not_equal(symbols, 0, out=scratch.get("nonzero", symbols.size, np.bool_))
    bitmap = zstd_compress(np.packbits(nonzero, bitorder="little").data, scratch)
    values = symbols[nonzero]
    values -= 1
    rest = zstd_compress(packing.pack(values, bits, scratch).data, scratch)
    return b"".join([len(bitmap).to_bytes(4, "little"), bitmap, rest])


def _zstd_decode(body: memoryview, bits: int, size: int, layout: int,
                 scratch: Scratch) -> np.ndarray:
    if layout == _PACKED:
        return _unpacked(body, bits, size, scratch)
    reader = Reader(body)
    frame = reader.take(reader.u32("bitmap length"), "bitmap")
    bitmap = np.frombuffer(zstd_decompress(frame, -(-size // 8), scratch), np.uint8)
    nonzero = np.unpackbits(bitmap, count=size, bitorder="little").view(np.bool_)
    values = _unpacked(body[reader.pos:], bits, int(np.count_nonzero(nonzero)), scratch)
    symbols = scratch.get("symbols", size, np.uint8)
    symbols.fill(0)
    symbols[nonzero] = values + np.uint8(1)
    if values.size and int(values.max()) + 1 >> bits:
        raise CodecError(f"corrupt blob: symbol {int(values.max()) + 1} needs more than {bits} "
                         f"bits")
    return symbols


def _unpacked(body: memoryview, bits: int, size: int, scratch: Scratch) -> np.ndarray:
    packed = zstd_decompress(body, packing.packed_size(bits, size), scratch)
    symbols = packing.unpack(np.frombuffer(packed, np.uint8), bits, size, scratch)
    if symbols.size and int(symbols.max()) >> bits:
        raise CodecError(f"corrupt blob: symbol {int(symbols.max())} needs more than {bits} bits")
    return symbols


def zstd_compress(data: bytes | memoryview, scratch: Scratch) -> bytes:
    """zstd level 1 frame of ``data``, with the calling thread's compression context."""
    compressor = scratch.keep("zstd_c", lambda: zstandard.ZstdCompressor(level=ZSTD_LEVEL))
    return compressor.compress(data)


def zstd_decompress(body: memoryview, size: int, scratch: Scratch) -> bytes:
    """Decompresses one frame that must hold exactly ``size`` bytes.

    Raises:
        CodecError: the frame is invalid or of another size.
    """
    decompressor = scratch.keep("zstd_d", zstandard.ZstdDecompressor)
    check_zstd_size(body, size)  # first: zstandard sizes its output from the frame's claim
    try:
        data = decompressor.decompress(body, max_output_size=size)
    except zstandard.ZstdError as exc:
        raise CodecError(f"corrupt blob: zstd frame does not decode ({exc})") from exc
    if len(data) != size:
        raise CodecError(f"corrupt blob: zstd frame holds {len(data)} bytes, expected {size}")
    return data


def check_zstd_size(body: memoryview, size: int) -> None:
    """Raises ``CodecError`` unless the frame header declares exactly ``size`` bytes.

    Cheap (reads the frame header only), so callers check every chunk before allocating the
    output: a corrupt size field must not turn into a huge allocation.
    """
    try:
        declared = zstandard.frame_content_size(body)
    except zstandard.ZstdError as exc:
        raise CodecError(f"corrupt blob: invalid zstd frame header ({exc})") from exc
    if declared != size:
        raise CodecError(f"corrupt blob: zstd frame declares {declared} bytes, expected {size}")
