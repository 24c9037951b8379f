"""Round trips of the public codec API: bit-exact delta decode, lossless exact path."""

from __future__ import annotations

import numpy as np
import pytest
from ckptd.daemon.codec import (
    CodecError,
    Coder,
    Representative,
    blob_info,
    decode_delta,
    decode_exact,
    encode_delta,
    encode_exact,
)
from ckptd.daemon.codec.chunks import CHUNK_ELEMS
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

FLOAT_DTYPES = [np.float32, np.float16, np.float64]
SHAPES = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=9)


def _bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@st.composite
def delta_pairs(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, bool]:
    """(current, reference, is_bfloat16) with any bit patterns, NaN and Inf included."""
    bfloat16 = draw(st.booleans())
    dtype = np.uint16 if bfloat16 else draw(st.sampled_from(FLOAT_DTYPES))
    shape = draw(SHAPES)
    elements: st.SearchStrategy[float] | st.SearchStrategy[int]
    if bfloat16:
        elements = st.integers(0, 0xFFFF)
    else:
        width = {2: 16, 4: 32, 8: 64}[np.dtype(dtype).itemsize]
        elements = st.floats(width=width, allow_subnormal=True)  # type: ignore[arg-type]
    reference = draw(hnp.arrays(dtype, shape, elements=elements))
    noise = draw(hnp.arrays(dtype, shape, elements=elements))
    # Mostly small changes around the reference, sometimes arbitrary values.
    if draw(st.booleans()) and not bfloat16:
        with np.errstate(all="ignore"):
            current = (reference + noise * dtype(1e-3)).astype(dtype)
    else:
        current = noise
    return current, reference, bfloat16


@settings(max_examples=150, deadline=None)
@given(pair=delta_pairs(), bits=st.integers(1, 8),
       coder=st.sampled_from(["zstd", "huffman"]),
       representative=st.sampled_from(["mean", "midrange"]))
def test_decode_equals_encoder_reconstruction(pair: tuple[np.ndarray, np.ndarray, bool],
                                              bits: int, coder: Coder,
                                              representative: Representative) -> None:
    current, reference, bfloat16 = pair
    blob, recon = encode_delta(current, reference, bits=bits, coder=coder,
                               representative=representative, bfloat16=bfloat16)
    assert recon.dtype == current.dtype and recon.shape == current.shape
    assert _bits_equal(decode_delta(blob, reference), recon)
    info = blob_info(blob)
    assert (info.kind, info.bits, info.coder, info.representative) == (
        "delta", bits, coder, representative)
    assert info.shape == current.shape and info.nbytes == current.nbytes
    assert info.dtype == ("bfloat16" if bfloat16 else np.dtype(current.dtype).name)


@pytest.mark.parametrize("coder", ["zstd", "huffman"])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
def test_multi_chunk_round_trip(coder: Coder, bits: int) -> None:
    """Several chunks (the last one partial) decode in order, every packing width."""
    rng = np.random.default_rng(bits)
    n = 2 * CHUNK_ELEMS + 12_345
    reference = rng.standard_normal(n, dtype=np.float32)
    current = reference + rng.standard_normal(n, dtype=np.float32) * np.float32(1e-3)
    blob, recon = encode_delta(current, reference, bits=bits, coder=coder)
    assert _bits_equal(decode_delta(blob, reference), recon)
    assert len(blob) < current.nbytes / 2


def test_an_output_must_fit_and_overlap_nothing() -> None:
    """``out=`` must be a separate writeable C-contiguous array of the holder dtype and size."""
    reference = np.linspace(-1, 1, 64, dtype=np.float32)
    current = reference + np.float32(1e-3)
    bad = {
        "dtype": np.empty(64, np.float64),
        "size": np.empty(63, np.float32),
        "read-only": np.empty(64, np.float32),
        "strided": np.empty(128, np.float32)[::2],
        "overlaps current": current,
        "overlaps reference": reference[::-1][::-1],
    }
    bad["read-only"].flags.writeable = False
    for out in bad.values():
        with pytest.raises(CodecError, match="out"):
            encode_delta(current, reference, out=out)
    out = np.empty((8, 8), np.float32)  # any shape of the right size
    blob, recon = encode_delta(current, reference, out=out)
    assert np.shares_memory(recon, out) and recon.shape == current.shape
    assert _bits_equal(decode_delta(blob, reference), recon)


def test_memoryview_and_bytearray_blobs_decode() -> None:
    reference = np.linspace(-1, 1, 100, dtype=np.float32)
    blob, recon = encode_delta(reference + np.float32(0.01), reference)
    assert _bits_equal(decode_delta(memoryview(blob), reference), recon)
    assert _bits_equal(decode_delta(memoryview(bytearray(blob)), reference), recon)
    exact = encode_exact(reference)
    assert _bits_equal(decode_exact(memoryview(exact)), reference)


def test_non_contiguous_and_big_endian_delta_inputs() -> None:
    rng = np.random.default_rng(1)
    base = rng.standard_normal((40, 30)).astype(np.float32)
    current = (base + np.float32(0.01)).T  # non-contiguous views
    reference = base.T
    blob, recon = encode_delta(current, reference)
    assert recon.shape == (30, 40)
    assert _bits_equal(decode_delta(blob, np.ascontiguousarray(reference)), recon)
    big_cur, big_ref = current.astype(">f4"), reference.astype(">f4")
    blob_be, recon_be = encode_delta(big_cur, big_ref)
    assert recon_be.tobytes() == recon.tobytes()
    assert blob_be == blob
    assert encode_delta(current, big_ref)[0] == blob  # mixed byte orders are one dtype


EXACT_DTYPES = [np.float32, np.float16, np.float64, np.int8, np.int16, np.int32, np.int64,
                np.uint8, np.uint16, np.uint32, np.uint64, np.bool_]


@settings(max_examples=120, deadline=None)
@given(data=st.data(), dtype=st.sampled_from(EXACT_DTYPES), bfloat16=st.booleans())
def test_exact_is_lossless(data: st.DataObject, dtype: type, bfloat16: bool) -> None:
    if bfloat16:
        dtype = np.uint16
    array = data.draw(hnp.arrays(dtype, SHAPES))
    if data.draw(st.booleans()) and array.ndim >= 1 and array.shape[0] > 1:
        array = array[::2]  # non-contiguous
    blob = encode_exact(array, bfloat16=bfloat16)
    out = decode_exact(blob)
    assert _bits_equal(out, array.copy())
    info = blob_info(blob)
    assert info.kind == "exact" and info.shape == array.shape and info.bits == 0
    assert info.dtype == ("bfloat16" if bfloat16 else np.dtype(dtype).name)


def test_exact_multi_chunk_float_planes_and_ints() -> None:
    rng = np.random.default_rng(2)
    weights = rng.standard_normal(CHUNK_ELEMS + 7).astype(np.float32) * np.float32(0.05)
    blob = encode_exact(weights)
    assert _bits_equal(decode_exact(blob), weights)
    assert len(blob) < weights.nbytes  # byte planes find the redundant exponent bytes
    steps = np.arange(3 * CHUNK_ELEMS // 2, dtype=np.int64)
    assert _bits_equal(decode_exact(encode_exact(steps)), steps)


def test_exact_zero_d_and_empty() -> None:
    for array in (np.array(2.5, np.float64), np.array(7, np.int32), np.zeros((0,), np.float32),
                  np.zeros((3, 0, 2), np.bool_)):
        out = decode_exact(encode_exact(array))
        assert _bits_equal(out, array)


def test_delta_zero_d_and_empty() -> None:
    for reference in (np.array(1.5, np.float32), np.zeros((0, 4), np.float16)):
        current = (reference + reference.dtype.type(0.25)).astype(reference.dtype)
        blob, recon = encode_delta(current, reference)
        assert _bits_equal(decode_delta(blob, reference), recon)
        assert recon.shape == reference.shape


@pytest.mark.parametrize("array", [np.zeros(3, np.complex64), np.array(["a"]),
                                   np.zeros(2, dtype=object), np.zeros(2, np.longdouble)])
def test_exact_rejects_unsupported_dtypes(array: np.ndarray) -> None:
    with pytest.raises(CodecError, match="unsupported dtype"):
        encode_exact(array)


def test_exact_rejects_bfloat16_flag_on_other_dtype() -> None:
    with pytest.raises(CodecError, match="bfloat16=True expects"):
        encode_exact(np.zeros(3, np.float32), bfloat16=True)
