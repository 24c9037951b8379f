"""The LC-Checkpoint method itself: buckets, priority promotion, representatives, NaN/Inf.

The expected symbols are computed here independently of the codec (exponents from
``np.frexp``, buckets from plain Python), then compared with what the codec reconstructs.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest
import torch
from ckptd.daemon.codec import Coder, Representative, decode_delta, encode_delta
from ckptd.daemon.codec.format import unpack_header
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp


def _reps_of(blob: bytes) -> np.ndarray:
    """Representatives of symbols 1..2^b-1, read from the payload (format: right after header)."""
    header = unpack_header(memoryview(blob))
    return np.frombuffer(blob, "<f4", (1 << header.bits) - 1, header.size)


def _expected_buckets(delta: np.ndarray, bits: int) -> tuple[list[tuple[int, int]], dict]:
    """Kept (sign, exponent) buckets in symbol order, and the members of every bucket."""
    members: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, d in enumerate(delta.astype(np.float64)):
        if d == 0 or not np.isfinite(d) or abs(d) < 2.0**-126:
            continue
        exponent = int(np.frexp(d)[1]) - 1  # d = m * 2^(e+1), 0.5 <= |m| < 1
        members[(int(d < 0), exponent)].append(i)
    order = sorted(members, key=lambda k: (-k[1], -len(members[k]), k[0]))
    return order[: (1 << bits) - 1], members


def test_paper_figure_1() -> None:
    """b = 2, midrange: buckets 2^-1 (+), 2^-2 (+) and 2^-2 (-) are kept, the rest is zero."""
    delta = np.array([0.76, -0.48, 0.2, 0.07, 0.18, 0.49, 0.14, 0.39, 0.82, 0.09], np.float32)
    reference = np.zeros_like(delta)
    blob, recon = encode_delta(delta, reference, bits=2, representative="midrange")
    assert np.flatnonzero(recon).tolist() == [0, 1, 5, 7, 8]
    np.testing.assert_allclose(recon[[0, 1, 5, 7, 8]], [0.79, -0.48, 0.44, 0.44, 0.79],
                               rtol=1e-6)
    assert recon.tobytes() == decode_delta(blob, reference).tobytes()
    # Symbol order: exponent -1 first, then the fuller sign of exponent -2 (two positives).
    np.testing.assert_allclose(_reps_of(blob), [0.79, 0.44, -0.48], rtol=1e-6)


def test_promotion_prefers_magnitude_over_population() -> None:
    """One huge outlier keeps its bucket although thousands of elements sit lower."""
    delta = np.full(5000, 1e-3, np.float32)
    delta[17] = 64.0
    reference = np.zeros_like(delta)
    _, recon = encode_delta(delta, reference, bits=1)
    assert np.flatnonzero(recon).tolist() == [17]
    assert recon[17] == 64.0


@st.composite
def finite_pairs(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    n = draw(st.integers(1, 300))
    scale = draw(st.sampled_from([1e-6, 1e-3, 1.0, 1e3]))
    elements = st.floats(-4, 4, width=32)
    reference = draw(hnp.arrays(np.float32, n, elements=elements))
    step = draw(hnp.arrays(np.float32, n, elements=elements)) * np.float32(scale)
    return (reference + step).astype(np.float32), reference


@settings(max_examples=120, deadline=None)
@given(pair=finite_pairs(), bits=st.integers(1, 8),
       representative=st.sampled_from(["mean", "midrange"]),
       coder=st.sampled_from(["zstd", "huffman"]))
def test_buckets_promotion_and_representatives(pair: tuple[np.ndarray, np.ndarray], bits: int,
                                               representative: Representative,
                                               coder: Coder) -> None:
    current, reference = pair
    blob, recon = encode_delta(current, reference, bits=bits,
                               representative=representative, coder=coder)
    delta = current - reference  # float32, exactly as the codec computes it
    kept, members = _expected_buckets(delta, bits)
    reps = _reps_of(blob)
    assert len(set(reps[: len(kept)].tolist())) <= (1 << bits) - 1
    symbol = np.zeros(delta.size, np.int64)
    for s, key in enumerate(kept, start=1):
        values = delta[members[key]].astype(np.float64)
        expected = values.mean() if representative == "mean" else (values.min() + values.max()) / 2
        assert reps[s - 1] == pytest.approx(np.float32(expected), rel=2e-7, abs=0)
        symbol[members[key]] = s
        exponent = key[1]
        # Every kept element is off by at most its bucket's width 2^e (plus final rounding).
        index = members[key]
        error = np.abs(recon[index].astype(np.float64) - current[index])
        magnitude = np.max(np.abs([recon[index], current[index], reference[index]]), axis=0)
        assert np.all(error <= 2.0**exponent + 4 * np.spacing(magnitude))
    # Reconstruction is reference + rep[symbol] in float32; symbol 0 keeps the reference.
    full = np.concatenate([[np.float32(-0.0)], reps])
    assert recon.tobytes() == (reference + full[symbol]).astype(np.float32).tobytes()
    dropped = symbol == 0
    assert recon[dropped].tobytes() == reference[dropped].tobytes()
    if kept:  # priority promotion: nothing dropped has a larger exponent than what is kept
        smallest_kept = min(e for _, e in kept)
        for key in members:
            if key not in kept:
                assert key[1] <= smallest_kept, (key, kept)


def test_negative_zero_reference_is_kept_bit_for_bit() -> None:
    reference = np.array([-0.0, 0.0, -0.0, 1.0], np.float32)
    current = np.array([-0.0, 0.0, 1e-30, 2.0], np.float32)
    _, recon = encode_delta(current, reference, bits=1)
    assert recon[:3].tobytes() == reference[:3].tobytes()
    assert recon[3] == 2.0


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
def test_nan_and_inf_are_exceptions_and_leave_others_unaffected(dtype: type) -> None:
    rng = np.random.default_rng(3)
    reference: np.ndarray = rng.standard_normal(500).astype(dtype)
    clean: np.ndarray = (reference + rng.standard_normal(500) * 1e-2).astype(dtype)
    special = [3, 50, 51, 400, 499]
    current, reference_x = clean.copy(), reference.copy()
    current[3] = np.nan
    current[50] = np.inf
    current[51] = -np.inf
    reference_x[400] = np.inf  # delta is -Inf/NaN although current is finite
    reference_x[499] = np.nan
    clean[special] = reference[special]  # the same elements with a zero delta
    _, recon_clean = encode_delta(clean, reference)
    blob, recon = encode_delta(current, reference_x)
    assert recon[special].tobytes() == current[special].tobytes()
    others = np.setdiff1d(np.arange(500), special)
    assert recon[others].tobytes() == recon_clean[others].tobytes()
    assert decode_delta(blob, reference_x).tobytes() == recon.tobytes()


def test_nan_payload_and_sign_survive() -> None:
    words = np.array([0x7FC00001, 0xFFC12345, 0x7F800000, 0xFF800000], np.uint32)
    current = words.view(np.float32)
    reference = np.zeros(4, np.float32)
    blob, recon = encode_delta(current, reference)
    assert recon.view(np.uint32).tolist() == words.tolist()
    assert decode_delta(blob, reference).view(np.uint32).tolist() == words.tolist()


def test_overflowing_reconstruction_stores_current() -> None:
    """ref + rep would overflow for element 0 though its current value is finite."""
    reference = np.array([2.9e38, 0.0], np.float32)
    current = np.array([2.9e38 + 2.0**125, 1.99 * 2.0**125], np.float32)
    blob, recon = encode_delta(current, reference, bits=8, representative="midrange")
    assert np.isfinite(recon).all()
    assert recon[0] == current[0]
    assert decode_delta(blob, reference).tobytes() == recon.tobytes()


def test_float16_overflow_and_rounding() -> None:
    """Elements 0 and 1 share the bucket [512, 1024): its mean would overflow element 0."""
    reference = np.array([64992, 0.0, 1.0, -3.0], np.float16)
    current = np.array([65504, 1000, 1.001, -3.0], np.float16)
    blob, recon = encode_delta(current, reference, bits=8)
    assert np.isfinite(recon).all()
    assert recon[0] == current[0]
    assert recon[1] == np.float16(756)
    reps = np.concatenate([[np.float32(-0.0)], _reps_of(blob)])
    assert decode_delta(blob, reference).tobytes() == recon.tobytes()
    # Every element is float16(float32(ref) + rep) for one of the representatives, or exact.
    for r, c, u in zip(reference, current, recon, strict=True):
        with np.errstate(over="ignore"):
            candidates = (np.float32(r) + reps).astype(np.float16)
        assert u in candidates or u == c


def test_bfloat16_delta_reconstruction_is_bfloat16() -> None:
    rng = np.random.default_rng(5)
    ref32 = rng.standard_normal(2000).astype(np.float32)
    cur32 = ref32 + rng.standard_normal(2000).astype(np.float32) * np.float32(0.01)
    reference, current = _to_bfloat16_words(ref32), _to_bfloat16_words(cur32)
    blob, recon = encode_delta(current, reference, bfloat16=True)
    assert recon.dtype == np.uint16
    assert decode_delta(blob, reference).tobytes() == recon.tobytes()
    error = np.abs(_words_to_f32(recon) - _words_to_f32(current))
    assert error.max() < 0.05  # within the quantization of a ~0.01 step


def _to_bfloat16_words(values: np.ndarray) -> np.ndarray:
    return torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def _words_to_f32(words: np.ndarray) -> np.ndarray:
    return (words.astype(np.uint32) << 16).view(np.float32)
