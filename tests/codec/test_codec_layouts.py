"""The zstd coder's layouts on their own: both modes decode to ``reps[symbols]``, the
adaptive choice keeps the smaller body, and malformed bodies are ``CodecError``s."""

from __future__ import annotations

import numpy as np
import pytest
import zstandard
from ckptd.daemon.codec import chunks, layouts, packing, zstdio
from ckptd.daemon.codec.chunks import Scratch
from ckptd.daemon.codec.format import CodecError
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp


def _reps(bits: int) -> np.ndarray:
    reps = (np.arange(1 << bits, dtype=np.float32) + np.float32(0.5)) * np.float32(-0.25)
    reps[0] = -0.0
    return reps


def _symbols(data: st.DataObject, bits: int, max_size: int = 300) -> np.ndarray:
    zero_heavy = st.one_of(st.just(0), st.integers(0, (1 << bits) - 1))
    return data.draw(hnp.arrays(np.uint8, st.integers(1, max_size), elements=zero_heavy))


def _decode(body: bytes, bits: int, n: int, layout: int = layouts.ADAPTIVE) -> np.ndarray:
    decode = layouts.chunk_decoder(layout, bits, _reps(bits))
    return decode(memoryview(body), n, Scratch()).copy()


@settings(max_examples=120, deadline=None)
@given(bits=st.integers(1, 8), data=st.data())
def test_value_table_matches_a_plain_lookup(bits: int, data: st.DataObject) -> None:
    symbols = _symbols(data, bits, 70)
    scratch = Scratch()
    packed = np.array(packing.pack(symbols, bits, scratch))
    table = packing.ValueTable.build(_reps(bits), bits)
    assert table.valid(packed, symbols.size, scratch)
    values = table.lookup(packed, symbols.size, scratch, "values")
    assert np.array_equal(values.view(np.uint32), _reps(bits)[symbols].view(np.uint32))
    nonzero = packing.ValueTable.build(_reps(bits), bits, lo=1)
    assert nonzero.valid(packed, symbols.size, scratch) == bool(np.all(symbols != 0))


@settings(max_examples=80, deadline=None)
@given(bits=st.integers(1, 8), data=st.data())
def test_both_modes_decode_to_the_values(bits: int, data: st.DataObject) -> None:
    symbols = _symbols(data, bits)
    expected = _reps(bits)[symbols].view(np.uint32)
    scratch = Scratch()
    for body in (layouts._packed_body(symbols, bits, scratch),
                 layouts._split_body(symbols, bits, scratch)):
        assert np.array_equal(_decode(body, bits, symbols.size).view(np.uint32), expected)


def test_adaptive_keeps_the_smaller_body() -> None:
    rng = np.random.default_rng(3)
    sparse = np.where(rng.random(5000) < 0.9, 0, rng.integers(1, 8, 5000)).astype(np.uint8)
    dense = rng.integers(0, 8, 5000).astype(np.uint8)
    scratch = Scratch()
    for symbols, mode in ((sparse, 1), (dense, 0)):
        body = layouts.encode_adaptive(symbols, 3, scratch)
        sizes = [len(layouts._packed_body(symbols, 3, scratch)),
                 len(layouts._split_body(symbols, 3, scratch))]
        assert body[0] == mode and len(body) == min(sizes)


def test_large_chunks_choose_on_a_sample() -> None:
    rng = np.random.default_rng(4)
    n = layouts.FULL_TRIAL_ELEMS + 1000
    sparse = np.where(rng.random(n) < 0.9, 0, rng.integers(1, 8, n)).astype(np.uint8)
    body = layouts.encode_adaptive(sparse, 3, Scratch())
    assert body[0] == 1
    assert np.array_equal(_decode(body, 3, n), _reps(3)[sparse])


def _bare(data: bytes) -> bytes:
    return zstdio.compress_bare(np.frombuffer(data, np.uint8), Scratch())


def test_out_of_range_symbols_are_rejected() -> None:
    with pytest.raises(CodecError, match=r"outside 0\.\.7"):  # nibble 8 at b = 3
        _decode(b"\x00" + _bare(bytes([0x08, 0x11])), 3, 4)
    bitmap = _bare(bytes([0b11]))
    split = b"\x01" + len(bitmap).to_bytes(4, "little") + bitmap
    with pytest.raises(CodecError, match=r"outside 1\.\.7"):  # a 0 among the non-zero symbols
        _decode(split + _bare(bytes([0x01])), 3, 2)
    with pytest.raises(CodecError, match=r"outside 0\.\.31"):  # 5-bit symbols, one per byte
        _decode(b"\x00" + _bare(bytes([3, 32])), 5, 2)


def test_malformed_bodies_are_rejected() -> None:
    with pytest.raises(CodecError, match="empty chunk body"):
        _decode(b"", 3, 4)
    with pytest.raises(CodecError, match="layout mode 7"):
        _decode(b"\x07" + _bare(bytes(2)), 3, 4)
    with pytest.raises(CodecError, match="holds 2 bytes, expected 3"):
        _decode(b"\x00" + _bare(bytes(2)), 3, 6)
    with pytest.raises(CodecError, match="does not decode"):
        _decode(b"\x00" + _bare(bytes(4)), 3, 6)
    with pytest.raises(CodecError, match="empty symbol stream"):
        bitmap = _bare(bytes(1))
        _decode(b"\x01" + len(bitmap).to_bytes(4, "little") + bitmap + b"x", 3, 4)


def test_legacy_split_stream_holds_symbol_minus_one() -> None:
    scratch = Scratch()
    symbols = np.array([0, 3, 0, 7, 1], np.uint8)
    bitmap = zstdio.compress(np.packbits(symbols != 0, bitorder="little").data, scratch)
    rest = zstdio.compress(packing.pack(symbols[symbols != 0] - 1, 3, scratch).data, scratch)
    body = len(bitmap).to_bytes(4, "little") + bitmap + rest
    decoded = _decode(body, 3, symbols.size, layouts.LEGACY_SPLIT)
    assert np.array_equal(decoded.view(np.uint32), _reps(3)[symbols].view(np.uint32))
    bad = zstdio.compress(packing.pack(np.array([7], np.uint8), 3, scratch).data, scratch)
    one = zstdio.compress(np.packbits(np.array([1], bool), bitorder="little").data, scratch)
    with pytest.raises(CodecError, match=r"outside 0\.\.6"):
        _decode(len(one).to_bytes(4, "little") + one + bad, 3, 1, layouts.LEGACY_SPLIT)


def _frame(data: bytes, **params: int) -> bytes:
    compressor = zstandard.ZstdCompressor(
        compression_params=zstandard.ZstdCompressionParameters.from_level(
            1, format=zstandard.FORMAT_ZSTD1_MAGICLESS, **params))
    stream = compressor.compressobj()  # size unknown: the window stays as configured
    return stream.compress(data) + stream.flush()


def test_bare_frame_headers_cannot_claim_big_buffers() -> None:
    """A sealed but malformed header must not make zstandard allocate what it claims."""
    claims_4 = zstandard.ZstdCompressor(compression_params=zstandard.ZstdCompressionParameters
                                        .from_level(1, format=zstandard.FORMAT_ZSTD1_MAGICLESS)
                                        ).compress(bytes(4))
    with pytest.raises(CodecError, match="declares 4 bytes, expected 3"):
        zstdio.decompress_bare(memoryview(claims_4), 3, Scratch())
    with pytest.raises(CodecError, match="window of 8388608 bytes for 3 bytes"):
        zstdio.decompress_bare(memoryview(_frame(bytes(3), window_log=23)), 3, Scratch())
    assert zstdio.decompress_bare(memoryview(_frame(bytes(3), window_log=12)), 3,
                                  Scratch()) == bytes(3)
    with pytest.raises(CodecError, match="invalid zstd frame header"):
        zstdio.decompress_bare(memoryview(b"\xff"), 3, Scratch())


def test_large_outputs_are_ordinary_arrays() -> None:
    """The small-pages advice leaves a normal, writable, owned numpy array."""
    count = chunks.SMALL_PAGES_MIN_BYTES // 4 + 3
    out = chunks.empty_output(count, np.dtype(np.float32))
    assert out.shape == (count,) and out.dtype == np.float32 and out.flags.writeable
    out.fill(1.5)
    assert float(out[-1]) == 1.5 and out.base is None


@settings(max_examples=120, deadline=None)
@given(bits=st.integers(1, 8), data=st.data())
def test_split_streams_equal_packbits_and_compress(bits: int, data: st.DataObject) -> None:
    # The compiled split (issue 17, encode CPU) writes the bytes of the numpy passes it
    # replaced, whatever the zero pattern and the size modulo 8 and per byte.
    symbols = _symbols(data, bits, max_size=2000)
    nonzero = symbols != 0
    bitmap, packed = packing.split(symbols, bits, Scratch())
    assert bitmap.tobytes() == np.packbits(nonzero, bitorder="little").tobytes()
    expected = packing.pack(np.compress(nonzero, symbols), bits, Scratch())
    assert packed.tobytes() == expected.tobytes()


def test_populated_pages_keep_their_bytes() -> None:
    # Populating is advice: bytes already written (a recycled buffer) stay as they are.
    array = np.arange(3 << 20, dtype=np.uint8)
    expected = array.copy()
    chunks.populate(array[5:])
    chunks.populate(array[:10])  # less than a page: nothing to do
    np.testing.assert_array_equal(array, expected)
