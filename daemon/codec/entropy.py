"""Symbol coders: how a chunk's uint8 symbols become bytes, and bytes become float32 values.

Two coders, chosen per blob and recorded in its header:

* ``zstd`` (default): symbols packed whole into bytes (``packing``), then zstd level 1. Its
  one parameter byte names the layout family; the layouts themselves live in ``layouts``:

  - ``adaptive`` (2, written since 2026-11): every chunk body starts with a mode byte,
    ``packed`` or ``split``, picked per chunk by trying both (on a sample of large
    chunks) and keeping the smaller; frames are magicless and omit the content size
    (the decoder knows it), 6-9 bytes less per frame.
  - ``packed`` (0) and ``split`` (1): the original layouts, one for the whole blob, chosen
    by the zero fraction; still decoded, no longer written.

* ``huffman``: the paper's canonical Huffman code (``huffman``): never below 1 bit/symbol.

Call order: ``encoder(sym_counts, bits, count)`` once per tensor (after promotion, so the
coder can look at the exact symbol counts); its ``params`` go into the blob and its
``encode`` runs once per chunk, possibly from several threads. Decoding calls ``decoder``
once with every chunk body and the representatives and gets back ``(chunk index, scratch)
-> float32 contributions`` (``reps[symbol]`` of every element): the zstd layouts produce them
straight from the packed bytes through a 256-entry table, with no symbol array in between.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from . import huffman, layouts, zstdio
from .chunks import Scratch
from .format import CodecError

_F32 = np.dtype(np.float32)


@dataclass(frozen=True)
class ChunkEncoder:
    """The per-tensor encoder: parameters to store, and ``(symbols, scratch) -> body``."""

    params: bytes
    encode: Callable[[np.ndarray, Scratch], bytes]


def encoder(coder: str, sym_counts: np.ndarray, bits: int, count: int) -> ChunkEncoder:
    """Prepares the encoder of ``coder`` for a tensor with these symbol counts."""
    if coder == "zstd":
        return ChunkEncoder(bytes([layouts.ADAPTIVE]),
                            lambda symbols, scratch: layouts.encode_adaptive(symbols, bits,
                                                                             scratch))
    code = huffman.make_code(huffman.code_lengths(sym_counts))
    block = huffman.block_size(count)
    return ChunkEncoder(huffman.encode_params(code.lengths, block),
                        lambda symbols, _: huffman.encode_chunk(symbols, code, block))


def decoder(coder: str, params: memoryview, bits: int, bodies: list[memoryview],
            sizes: list[int], *, reps: np.ndarray) -> Callable[[int, Scratch], np.ndarray]:
    """``(chunk index, scratch) -> reps[symbols]`` (float32) for the chunks of one blob.

    The result may live in ``scratch``: use it before the next call from the same thread.
    """
    if coder == "zstd":
        if len(params) != 1 or params[0] not in layouts.LAYOUTS:
            raise CodecError(f"corrupt blob: zstd coder parameters {bytes(params)!r}")
        decode = layouts.chunk_decoder(params[0], bits, reps)
        return lambda i, scratch: decode(bodies[i], sizes[i], scratch)
    lengths, block = huffman.parse_params(params, bits)
    symbols_of = huffman.decoder(bodies, sizes, lengths, block)

    def contributions(i: int, scratch: Scratch) -> np.ndarray:
        symbols = symbols_of(i)
        return np.take(reps, symbols, out=scratch.get("contrib", symbols.size, _F32))

    return contributions


# The standard-frame helpers, used by the exact path and the exception list.
zstd_compress = zstdio.compress
zstd_decompress = zstdio.decompress
check_zstd_size = zstdio.check_size
