"""Finer buckets than octaves (``buckets_per_octave`` 2 or 4; issue 16, lm's rework).

The option changes which key an element falls in, an encoder's choice only: the blob
format and decode are the same, so the reconstruction must decode bit for bit, the default
(1) must write the very bytes it wrote before, and each kept element must come back within
1/P of its change (a bucket spans 1/P of an octave and decodes to its mean).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ckptd.daemon import codec
from ckptd.daemon.codec import CodecError, blob_info, quantize
from hypothesis import given, settings
from hypothesis import strategies as st


def _pair(seed: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(reference, current): changes spread over many octaves, both signs."""
    rng = np.random.default_rng(seed)
    reference = rng.standard_normal(size).astype(np.float32)
    change = rng.standard_normal(size) * 10.0 ** rng.uniform(-4, -1, size)
    return reference, (reference + change).astype(np.float32)


def _as(dtype: str, values: np.ndarray) -> np.ndarray:
    if dtype == "bfloat16":
        return torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(
            np.uint16)
    return values.astype(dtype)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), size=st.integers(1, 3000),
       bits=st.integers(1, 8), per_octave=st.sampled_from([2, 4]),
       dtype=st.sampled_from(["float32", "float16", "bfloat16", "float64"]),
       domain=st.sampled_from(["linear", "scaled"]),
       representative=st.sampled_from(["mean", "midrange"]))
def test_decode_is_the_encoders_reconstruction(  # noqa: PLR0917 (hypothesis draws them)
        seed: int, size: int, bits: int, per_octave: int, dtype: str, domain: str,
        representative: str) -> None:
    reference, current = (_as(dtype, a) for a in _pair(seed, size))
    bf16 = dtype == "bfloat16"
    blob, rec = codec.encode_delta(current, reference, bits=bits, bfloat16=bf16,
                                   domain=domain,  # type: ignore[arg-type]
                                   representative=representative,  # type: ignore[arg-type]
                                   buckets_per_octave=per_octave)
    decoded = codec.decode_delta(blob, reference)
    assert decoded.tobytes() == rec.tobytes()
    assert blob_info(blob).bits == bits


def _numpy_reconstruction(current: np.ndarray, reference: np.ndarray, bits: int,
                          per_octave: int) -> np.ndarray:
    """The method in numpy: keys of sign, exponent and top mantissa bits, their statistics
    (counts, whole-mantissa sums), promotion and means by ``quantize``, then the addition."""
    delta = (current - reference).astype(np.float32)
    pattern = delta.view(np.uint32).astype(np.int64)
    key_bits = quantize.key_bits(per_octave)
    keys = pattern >> (23 - key_bits)
    nkeys = quantize.NKEYS << key_bits
    stats = quantize.Stats(np.bincount(keys, minlength=nkeys).astype(np.int64),
                           np.bincount(keys, weights=pattern & 0x7FFFFF,
                                       minlength=nkeys).astype(np.uint64),
                           None, None, key_bits)
    plan = quantize.make_plan(stats, bits, "mean")
    return (reference + plan.reps[plan.lut[keys]]).astype(np.float32)


@pytest.mark.parametrize("per_octave", [2, 4])
@pytest.mark.parametrize("bits", [2, 3, 5])
def test_kernels_match_the_numpy_method(per_octave: int, bits: int) -> None:
    """Two chunks and a tail: the compiled passes' statistics merge to the whole tensor's."""
    reference, current = _pair(11, codec.chunks.CHUNK_ELEMS * 2 + 77)
    _, rec = codec.encode_delta(current, reference, bits=bits, buckets_per_octave=per_octave)
    expected = _numpy_reconstruction(current, reference, bits, per_octave)
    assert rec.tobytes() == expected.tobytes()


@pytest.mark.parametrize("per_octave", [1, 2, 4])
def test_a_kept_element_is_within_its_bucket(per_octave: int) -> None:
    """A kept element's restored change is within 1/P of its change (plus the float32
    rounding of the addition); at b=8 every bucket is kept, and finer buckets (a refinement,
    each decoding to its mean) never restore with more squared error."""
    reference, current = _pair(3, 20000)
    delta = current.astype(np.float64) - reference
    errors = {}
    for p in (per_octave, 1):
        _, rec = codec.encode_delta(current, reference, bits=8, buckets_per_octave=p)
        restored = rec.astype(np.float64) - reference
        kept = rec != reference
        ulp = np.spacing(np.abs(rec[kept]))
        assert np.all(np.abs(restored[kept] - delta[kept]) <= np.abs(delta[kept]) / p + ulp)
        errors[p] = float(np.sum((rec.astype(np.float64) - current) ** 2))
    assert errors[per_octave] <= errors[1]
    if per_octave > 1:
        assert errors[per_octave] < 0.5 * errors[1]


def test_the_default_writes_the_same_bytes() -> None:
    reference, current = _pair(5, 5000)
    for bits in (2, 3, "auto"):
        plain, _ = codec.encode_delta(current, reference, bits=bits)  # type: ignore[arg-type]
        octave, _ = codec.encode_delta(current, reference, bits=bits,  # type: ignore[arg-type]
                                       buckets_per_octave=1)
        assert plain == octave


def test_auto_width_counts_the_kept_buckets_error() -> None:
    """With finer buckets bits="auto" bounds the restored error (kept buckets' spread
    included, estimated), so a tighter state-relative budget takes more bits and the
    restored error follows the budget."""
    reference, current = _pair(9, 50000)
    norm = float(np.linalg.norm(reference))
    widths = []
    for eps in (0.03, 0.01, 0.003):
        blob, rec = codec.encode_delta(current, reference, bits="auto", auto_max_error=eps,
                                       auto_relative_to="state", buckets_per_octave=4)
        widths.append(blob_info(blob).bits)
        assert np.linalg.norm(rec.astype(np.float64) - current) / norm <= 1.5 * eps
    assert widths == sorted(widths) and widths[0] < widths[-1]


@pytest.mark.parametrize("value", [0, 3, 8, True, 2.5, "2"])
def test_bad_buckets_per_octave_is_refused(value: object) -> None:
    reference, current = _pair(1, 10)
    with pytest.raises(CodecError, match=r"buckets_per_octave must be one of \(1, 2, 4\), got"):
        codec.encode_delta(current, reference, buckets_per_octave=value)  # type: ignore[arg-type]


def test_the_log_domain_keeps_octaves() -> None:
    reference, current = (np.abs(a) for a in _pair(1, 10))
    with pytest.raises(CodecError, match="buckets_per_octave 2 needs the linear or scaled"):
        codec.encode_delta(current, reference, domain="log", buckets_per_octave=2)
