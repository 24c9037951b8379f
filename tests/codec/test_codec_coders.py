"""Symbol coders on their own: canonical Huffman limits and streams, packing widths."""

from __future__ import annotations

import numpy as np
import pytest
from ckptd.daemon.codec import huffman, packing
from ckptd.daemon.codec.chunks import Scratch
from ckptd.daemon.codec.format import CodecError
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp


def _kraft(lengths: np.ndarray) -> float:
    present = lengths[lengths > 0].astype(np.float64)
    return float(np.sum(2.0**-present))


def test_code_lengths_are_limited_and_complete() -> None:
    fibonacci = [1, 1]
    while len(fibonacci) < 40:
        fibonacci.append(fibonacci[-1] + fibonacci[-2])
    counts = np.zeros(256, np.int64)
    counts[:40] = fibonacci  # an unlimited Huffman tree would be 39 deep
    lengths = huffman.code_lengths(counts)
    assert lengths.max() == huffman.MAX_CODE_BITS
    assert _kraft(lengths) == 1.0
    assert np.all(lengths[40:] == 0)


def test_single_symbol_gets_a_one_bit_code() -> None:
    counts = np.zeros(8, np.int64)
    counts[5] = 1000
    lengths = huffman.code_lengths(counts)
    assert lengths.tolist() == [0, 0, 0, 0, 0, 1, 0, 0]


def test_kraft_violation_is_rejected() -> None:
    with pytest.raises(CodecError, match="Kraft"):
        huffman.canonical_codes(np.array([1, 1, 1], np.uint8))
    with pytest.raises(CodecError, match="code length"):
        huffman.canonical_codes(np.array([13, 1], np.uint8))


def _round_trip(symbols: np.ndarray, bits: int, chunk: int) -> np.ndarray:
    counts = np.bincount(symbols, minlength=1 << bits)
    lengths = huffman.code_lengths(counts)
    code = huffman.make_code(lengths)
    block = huffman.block_size(symbols.size)
    chunk = max(block, chunk - chunk % block)
    pieces = [symbols[i:i + chunk] for i in range(0, symbols.size, chunk)]
    bodies = [memoryview(huffman.encode_chunk(p, code, block)) for p in pieces]
    decode = huffman.decoder(bodies, [p.size for p in pieces], lengths, block)
    return np.concatenate([decode(i) for i in range(len(pieces))] or [np.zeros(0, np.uint8)])


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 8), data=st.data(), chunk=st.integers(1, 5000))
def test_huffman_round_trip(bits: int, data: st.DataObject, chunk: int) -> None:
    n = data.draw(st.integers(0, 6000))
    skew = data.draw(st.floats(0.0, 0.999))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    symbols = rng.integers(0, 1 << bits, n).astype(np.uint8)
    symbols[rng.random(n) < skew] = 0
    assert np.array_equal(_round_trip(symbols, bits, chunk), symbols)


def test_huffman_size_tracks_entropy() -> None:
    rng = np.random.default_rng(0)
    probs = np.array([0.6, 0.2, 0.1, 0.05, 0.02, 0.02, 0.005, 0.005])
    symbols = rng.choice(8, 200_000, p=probs).astype(np.uint8)
    lengths = huffman.code_lengths(np.bincount(symbols, minlength=8))
    body = huffman.encode_chunk(symbols, huffman.make_code(lengths), 1024)
    entropy_bits = -np.sum(probs * np.log2(probs)) * symbols.size
    assert len(body) * 8 < 1.05 * entropy_bits + 16 * 100  # within Huffman's redundancy


def test_corrupt_block_length_is_detected() -> None:
    symbols = np.arange(1000, dtype=np.uint8) % 8
    lengths = huffman.code_lengths(np.bincount(symbols, minlength=8))
    body = bytearray(huffman.encode_chunk(symbols, huffman.make_code(lengths), 256))
    body[0] ^= 1  # first block's bit length off by one
    with pytest.raises(CodecError):
        huffman.decoder([memoryview(bytes(body))], [1000], lengths, 256)(0)


@settings(max_examples=80, deadline=None)
@given(bits=st.integers(1, 8), data=st.data())
def test_packing_round_trip(bits: int, data: st.DataObject) -> None:
    symbols = data.draw(hnp.arrays(np.uint8, st.integers(0, 70),
                                   elements=st.integers(0, (1 << bits) - 1)))
    scratch = Scratch()
    packed = np.array(packing.pack(symbols, bits, scratch))
    assert packed.size == packing.packed_size(bits, symbols.size)
    identity = packing.ValueTable.build(np.arange(1 << bits, dtype=np.float32), bits)
    assert np.array_equal(identity.lookup(packed, symbols.size, scratch, "values"), symbols)


def test_packing_layout_is_low_bits_first() -> None:
    scratch = Scratch()
    assert packing.pack(np.array([1, 2, 3], np.uint8), 3, scratch).tolist() == [0x21, 0x03]
    assert packing.pack(np.array([1, 2, 3, 0, 1], np.uint8), 2, scratch).tolist() == [0x39, 0x01]
    assert packing.pack(np.array([1, 0, 0, 1, 1], np.uint8), 1, scratch).tolist() == [0x19]
