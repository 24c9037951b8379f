"""Canonical, length-limited Huffman coding of symbol streams, vectorised with numpy.

This is the paper's entropy coder, kept for fidelity and comparison (the default coder,
zstd over packed symbols, is smaller and faster on real deltas: Huffman cannot go below one
bit per symbol). No per-element Python loop runs:

* Encode: bit offsets are the cumulative sum of code lengths; each code is shifted into the
  64-bit big-endian word where it starts (codes of one word OR-reduced with ``reduceat``),
  the few codes that straddle two words add their low part to the next one.
* Decode: the stream is cut into blocks of ``block`` symbols whose bit lengths are stored
  (16 bits per block). All blocks of the tensor decode in lockstep, one symbol per block per
  step, through a table indexed by the next ``MAX_CODE_BITS`` bits. Every block must end
  exactly where its stored length says, which catches corruption the checksum missed.

Chunk body: ``nblocks x u16`` block bit lengths, then the bit stream (MSB first, zero padded
to a byte). Parameters (shared by all chunks): ``2^b x u8`` code lengths, ``u32`` block size.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .format import CodecError, Reader

# 12 bits keep the decode table (4096 entries) in L1 while allowing 256 symbols; the cost
# of the limit is negligible (it only binds for symbols rarer than 2^-12).
MAX_CODE_BITS = 12
_WINDOW_BITS = 24  # a code of <= 12 bits starting at any bit of a byte fits in 3 bytes
_MAX_BLOCK = 1024
_MAX_BLOCK_READ = 4096  # what the format allows: 4096 * 12 bits still fits a u16 length


def block_size(count: int) -> int:
    """Symbols per block: ~sqrt(count)/2 within 128..1024.

    Decoding costs one step per symbol of a block (a dozen numpy calls, ~20 us whatever the
    width) plus the per-element work; longer blocks save 16 stored bits per block. This
    keeps the fixed step cost under ~2 ns/symbol for large tensors and the stored block
    lengths under 0.13 bits/symbol.
    """
    size = 1 << max((int(count).bit_length() + 1) // 2 - 1, 0)
    return int(min(max(size, 128), _MAX_BLOCK))


def code_lengths(counts: np.ndarray) -> np.ndarray:
    """Huffman code length of each symbol (0 for absent ones), at most ``MAX_CODE_BITS``.

    Over-long codes are avoided by halving the frequencies (keeping them >= 1) and rebuilding,
    which flattens the tree until it fits; deterministic ties keep encode reproducible.
    """
    lengths = np.zeros(counts.size, np.uint8)
    present = np.flatnonzero(counts)
    if present.size == 1:
        lengths[present] = 1
    if present.size <= 1:
        return lengths
    freq = counts[present].astype(np.int64)
    while True:
        depth = _tree_depths(freq)
        if depth.max() <= MAX_CODE_BITS:
            lengths[present] = depth
            return lengths
        freq = np.maximum(freq >> 1, 1)


def _tree_depths(freq: np.ndarray) -> np.ndarray:
    heap = [(int(f), i, [i]) for i, f in enumerate(freq)]
    heapq.heapify(heap)
    depth = np.zeros(freq.size, np.int64)
    serial = freq.size
    while len(heap) > 1:
        w1, _, a = heapq.heappop(heap)
        w2, _, b = heapq.heappop(heap)
        depth[a + b] += 1
        heapq.heappush(heap, (w1 + w2, serial, a + b))
        serial += 1
    return depth


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """Canonical code of each symbol (shorter codes first, then by symbol).

    Raises:
        CodecError: the lengths violate Kraft's inequality or the length limit.
    """
    if lengths.max(initial=0) > MAX_CODE_BITS:
        raise CodecError(f"corrupt blob: Huffman code length {lengths.max()} > {MAX_CODE_BITS}")
    codes = np.zeros(lengths.size, np.uint64)
    code, prev = 0, 0
    for sym in sorted(np.flatnonzero(lengths), key=lambda s: (lengths[s], s)):
        code <<= int(lengths[sym]) - prev
        prev = int(lengths[sym])
        if code >= 1 << prev:
            raise CodecError("corrupt blob: Huffman code lengths violate Kraft's inequality")
        codes[sym] = code
        code += 1
    return codes


def encode_params(lengths: np.ndarray, block: int) -> bytes:
    """Serialized parameters: code lengths, then the block size."""
    return lengths.tobytes() + np.uint32(block).astype("<u4").tobytes()


def parse_params(params: memoryview, bits: int) -> tuple[np.ndarray, int]:
    """Inverse of ``encode_params``, validated."""
    reader = Reader(params)
    lengths = reader.array(np.dtype(np.uint8), 1 << bits, "Huffman code lengths").copy()
    block = reader.u32("Huffman block size")
    reader.at_end()
    if not 1 <= block <= _MAX_BLOCK_READ:
        raise CodecError(f"corrupt blob: Huffman block size {block} outside 1..{_MAX_BLOCK_READ}")
    return lengths, block


@dataclass(frozen=True)
class Code:
    """A canonical code plus the tables that encode two symbols with one gather."""

    lengths: np.ndarray  # uint8[2^b]
    codes: np.ndarray  # uint64[2^b]
    pair_codes: np.ndarray  # uint32[65536]: codes of (s0, s1) at index s0 | s1 << 8
    pair_lengths: np.ndarray  # uint8[65536]


def make_code(lengths: np.ndarray) -> Code:
    """The canonical code of ``lengths`` and its symbol-pair tables."""
    codes = canonical_codes(lengths)
    first, second = np.divmod(np.arange(1 << 16), 256)[::-1]  # little-endian uint16 view
    lens = np.zeros(256, np.uint64)
    lens[: lengths.size] = lengths
    vals = np.zeros(256, np.uint64)
    vals[: codes.size] = codes
    pair_codes = (vals[first] << lens[second]) | vals[second]
    return Code(lengths, codes, pair_codes.astype(np.uint32),
                (lens[first] + lens[second]).astype(np.uint8))


def encode_chunk(symbols: np.ndarray, code: Code, block: int) -> bytes:
    """Block bit lengths followed by the bit stream of ``symbols`` (uint8).

    Symbols are first fused four at a time (two pair-table gathers, then one shift: at most
    48 bits), so the placement below runs on a quarter of the elements.
    """
    if block % 4:
        raise ValueError(f"Huffman block {block} must be a multiple of 4")
    whole = symbols.size - symbols.size % 4
    pairs = symbols[:whole].view("<u2").reshape(-1, 2)
    pair_lens = code.pair_lengths[pairs]
    pair_vals = code.pair_codes[pairs].astype(np.uint64)
    tail = symbols[whole:]
    lens = np.concatenate([pair_lens[:, 0].astype(np.int64) + pair_lens[:, 1],
                           code.lengths[tail]])
    vals = np.concatenate([(pair_vals[:, 0] << pair_lens[:, 1].astype(np.uint64))
                           | pair_vals[:, 1], code.codes[tail]])
    ends = np.cumsum(lens)
    nblocks = -(-symbols.size // block)
    last = np.minimum(np.arange(1, nblocks + 1) * (block // 4), whole // 4)
    if nblocks:
        last[-1] = lens.size  # the last block also holds the < 4 tail symbols
    block_bits = np.diff(ends[last - 1], prepend=0).astype("<u2")
    return block_bits.tobytes() + _place(vals, lens, ends)


def _place(vals: np.ndarray, lens: np.ndarray, ends: np.ndarray) -> bytes:
    """Concatenates variable-length codes (MSB first) into bytes."""
    total = int(ends[-1]) if ends.size else 0
    starts = ends - lens
    shift = 64 - (starts & 63) - lens  # negative: the code runs into the next word
    word = starts >> 6
    high = (vals << np.maximum(shift, 0).astype(np.uint64)) >> np.maximum(-shift, 0).astype(
        np.uint64)
    words = np.zeros(total // 64 + 2, np.uint64)
    if vals.size:
        first = np.flatnonzero(np.diff(word, prepend=-1))
        words[word[first]] = np.bitwise_or.reduceat(high, first)
    spill = np.flatnonzero(shift < 0)
    words[word[spill] + 1] |= vals[spill] << (64 + shift[spill]).astype(np.uint64)
    return words.astype(">u8").view(np.uint8)[: -(-total // 8)].tobytes()


def decoder(bodies: list[memoryview], sizes: list[int], lengths: np.ndarray,
            block: int) -> Callable[[int], np.ndarray]:
    """Decodes every chunk at once; returns chunk index -> its symbols.

    Raises:
        CodecError: a block does not end where its stored length says (corrupt stream).
    """
    if any(size % block for size in sizes[:-1]):
        raise CodecError(f"corrupt blob: chunk sizes are not multiples of the block {block}")
    starts, ends, counts, streams = _layout(bodies, sizes, block)
    if not starts.size:
        return lambda i: np.zeros(0, np.uint8)
    table = _decode_table(lengths)
    pad = np.zeros(block * MAX_CODE_BITS // 8 + 4, np.uint8)
    buf = np.concatenate([*streams, pad]).astype(np.uint32)
    window = (buf[:-2] << 16) | (buf[1:-1] << 8) | buf[2:]
    symbols = _lockstep(window, table, starts, ends=ends, counts=counts, block=block)
    offsets = np.cumsum([0, *sizes])
    return lambda i: symbols[offsets[i]:offsets[i + 1]]


def _layout(bodies: list[memoryview], sizes: list[int],
            block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[np.ndarray]]:
    """Absolute start/end bit and symbol count of every block; the chunk streams."""
    starts, ends, counts, streams = [], [], [], []
    base = 0
    for body, size in zip(bodies, sizes, strict=True):
        nblocks = -(-size // block)
        reader = Reader(body)
        bits = reader.array(np.dtype("<u2"), nblocks, "Huffman block lengths").astype(np.int64)
        stream = np.frombuffer(body[reader.pos:], np.uint8)
        block_end = np.cumsum(bits)
        total = int(block_end[-1]) if nblocks else 0
        if -(-total // 8) != stream.size:
            raise CodecError(f"corrupt blob: Huffman chunk holds {stream.size} bytes, its blocks "
                             f"need {total} bits")
        starts.append(base + block_end - bits)
        ends.append(base + block_end)
        count = np.full(nblocks, block, np.int64)
        if size % block:
            count[-1] = size % block
        counts.append(count)
        streams.append(stream)
        base += 8 * stream.size
    cat = np.concatenate
    empty = [np.zeros(0, np.int64)]
    return cat(starts + empty), cat(ends + empty), cat(counts + empty), streams


def _decode_table(lengths: np.ndarray) -> np.ndarray:
    """Next-MAX_CODE_BITS-bits -> ``symbol | length << 8`` (length 0: no such code)."""
    codes = canonical_codes(lengths)
    table = np.zeros(1 << MAX_CODE_BITS, np.uint16)
    for sym in np.flatnonzero(lengths):
        free = MAX_CODE_BITS - int(lengths[sym])
        lo = int(codes[sym]) << free
        table[lo:lo + (1 << free)] = sym | int(lengths[sym]) << 8
    return table


def _lockstep(window: np.ndarray, table: np.ndarray, starts: np.ndarray, *, ends: np.ndarray,
              counts: np.ndarray, block: int) -> np.ndarray:
    """One symbol of every block per step; checks each block's end position."""
    out = np.zeros((starts.size, block), np.uint8)
    pos = starts.copy()
    final = np.zeros_like(pos)
    stop = {int(c): np.flatnonzero(counts == c) for c in np.unique(counts)}
    mask = (1 << MAX_CODE_BITS) - 1
    for step in range(block + 1):
        done = stop.get(step)
        if done is not None:
            final[done] = pos[done]
        if step == block:
            break
        bits = np.take(window, pos >> 3) >> (_WINDOW_BITS - MAX_CODE_BITS - (pos & 7))
        entry = np.take(table, bits & mask)
        out[:, step] = entry
        pos += entry >> 8
    if not np.array_equal(final, ends):
        raise CodecError("corrupt blob: a Huffman block does not end at its stored length")
    return out.reshape(-1)
