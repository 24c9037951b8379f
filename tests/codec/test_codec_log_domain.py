"""The log domain: a lossy second moment never restores negative, and its chain holds.

Adversarial inputs for a tensor that must stay non-negative (Adam's ``exp_avg_sq``): exact
zeros, subnormals, values spanning 1e-30 to 1e3, a tensor that collapses to zero between
saves, and NaN/Inf/negative elements, which are stored verbatim as the linear domain stores
non-finite ones.
"""

from __future__ import annotations

import numpy as np
import pytest
from ckptd.daemon.codec import (
    AUTO_MAX_ERROR,
    blob_info,
    decode_delta,
    encode_delta,
    quantize,
)
from ckptd.daemon.codec.delta import parse_delta
from ckptd.daemon.codec.domains import LOG, Ops
from ckptd.daemon.codec.kernels import LOG_MAX_ERROR_OCTAVES
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

_SIGN = np.uint32(0x80000000)
_OCTAVE = 1 << 23  # float32 patterns per factor of 2


def _patterns(values: np.ndarray) -> np.ndarray:
    return values.view(np.int32).astype(np.int64)


def _spanning(n: int, seed: int) -> np.ndarray:
    """Log-uniform in [1e-30, 1e3], with exact zeros and subnormals mixed in."""
    rng = np.random.default_rng(seed)
    values = (10.0 ** rng.uniform(-30, 3, n)).astype(np.float32)
    values[rng.random(n) < 0.1] = 0.0
    values[rng.random(n) < 0.05] = np.float32(1e-40)  # subnormal
    values[rng.random(n) < 0.02] = np.float32(1.4e-45)  # the smallest subnormal
    return values


def _chain(states: list[np.ndarray], bits: int | str) -> list[np.ndarray]:
    """Encodes ``states`` as one chain (the first as its own reference, as a base) and checks
    every decode against the encoder's reconstruction, bit for bit."""
    held = states[0]
    out = []
    for state in states[1:]:
        blob, recon = encode_delta(state, held, bits=bits, domain="log")
        assert decode_delta(blob, held).tobytes() == recon.tobytes()
        assert blob_info(blob).domain == "log"
        held = recon
        out.append(recon)
    return out


def _assert_non_negative(recon: np.ndarray) -> None:
    assert not np.any(recon.view(np.uint32) & _SIGN), "a restored element is negative or -0.0"
    assert np.all(np.isfinite(recon))


@pytest.mark.parametrize("bits", [1, 2, 3, 8, "auto"])  # "auto": the shipped default
def test_adversarial_second_moment_restores_non_negative(bits: int | str) -> None:
    spanning = _spanning(5000, 0)
    states = [
        spanning,
        spanning * np.float32(0.5),
        np.zeros_like(spanning),  # collapses to zero between saves
        _spanning(5000, 1),  # and comes back, 33 decades wide
        np.full_like(spanning, 1e-40),  # all subnormal
        np.full_like(spanning, 1e3),
    ]
    for state, recon in zip(states[1:], _chain(states, bits), strict=True):
        _assert_non_negative(recon)
        zeros = state == 0
        assert np.all(recon[zeros] == 0), "an exact zero did not survive"


def test_zeros_survive_exactly_and_cost_nothing() -> None:
    zeros = np.zeros(10_000, np.float32)
    blob, recon = encode_delta(zeros, zeros, domain="log")
    assert recon.tobytes() == zeros.tobytes()
    assert len(blob) < 200


def test_relative_error_over_thirty_decades() -> None:
    """A 1% change of every element, whatever its magnitude, comes back within a few %:
    the error is relative (a linear delta drops every change below the largest buckets)."""
    reference = (10.0 ** np.linspace(-30, 3, 4096)).astype(np.float32)
    current = reference * np.float32(1.01)
    _, recon = encode_delta(current, reference, bits=3, domain="log")
    assert np.max(np.abs(recon / current - 1)) < 0.02
    _, linear = encode_delta(current, reference, bits=3)
    assert np.median(np.abs(linear / current - 1)) > np.median(np.abs(recon / current - 1))


def test_an_element_that_jumps_many_octaves_comes_back_within_the_bound() -> None:
    """An idle embedding row's second moment that sees a gradient again jumps by tens of
    octaves; its bucket's step is right only to a factor of 2 of the step, so it would
    come back octaves off (and the restored update m / sqrt(v) by a large factor). Such
    elements are stored verbatim: every element ends within the bound, a few cost bytes."""
    rng = np.random.default_rng(3)
    reference = (10.0 ** rng.uniform(-4, -2, 20_000)).astype(np.float32)
    current = reference * rng.uniform(0.8, 1.25, reference.size).astype(np.float32)
    jumped = rng.choice(reference.size, 200, replace=False)
    current[jumped] = reference[jumped] * (10.0 ** rng.uniform(3, 9, 200)).astype(np.float32)
    for bits in (2, 3, "auto"):
        blob, recon = encode_delta(current, reference, bits=bits, domain="log")
        assert decode_delta(blob, reference).tobytes() == recon.tobytes()
        octaves = np.abs(_patterns(recon) - _patterns(current)) / _OCTAVE
        assert octaves.max() <= LOG_MAX_ERROR_OCTAVES
        assert np.count_nonzero(recon != current) > current.size // 2  # the rest stays lossy
        assert len(blob) < 0.25 * current.nbytes


def _sparse_save(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """A second moment 50 steps apart (beta2 0.95): most elements decayed 3-4 octaves,
    others grew or shrank 1-4, a few jumped tens of octaves, some moved under one. Four
    populous buckets over the bound, three rare ones: more than b=2's three symbols."""
    rng = np.random.default_rng(seed)
    reference = (10.0 ** rng.uniform(-8, -4, n)).astype(np.float32)
    share = rng.random(n)
    parts = {"decayed": share < 0.45, "grew": (share >= 0.45) & (share < 0.70),
             "grew more": (share >= 0.70) & (share < 0.85),
             "shrank": (share >= 0.85) & (share < 0.95), "jumped": share >= 0.99}
    factor = rng.uniform(0.9, 1.1, n)  # "moved under an octave": the remaining 4 %
    factor[parts["decayed"]] = 0.95**50 * rng.uniform(0.9, 1.1, parts["decayed"].sum())
    factor[parts["grew"]] = rng.uniform(2.2, 3.5, parts["grew"].sum())
    factor[parts["grew more"]] = rng.uniform(5.0, 12.0, parts["grew more"].sum())
    factor[parts["shrank"]] = rng.uniform(0.3, 0.45, parts["shrank"].sum())
    factor[parts["jumped"]] = 10.0 ** rng.uniform(4, 8, parts["jumped"].sum())
    return (reference * factor).astype(np.float32), reference, parts


def _exceptions(blob: bytes, reference: np.ndarray) -> np.ndarray:
    return parse_delta(blob, reference).index


def test_a_sparse_save_keeps_the_buckets_that_would_be_exceptions() -> None:
    """Priority promotion at b=2 keeps the three largest steps, the rare jumps, and every
    element of the populous buckets it drops is more than an octave off, an exception (the
    decoder's second moment at K=50: 43 % of its elements, 46 MB a delta against b=3's 7,
    bench/README.md). The log domain keeps the buckets that save the most exceptions: only
    the fourth populous bucket and the jumps' stragglers are left verbatim."""
    current, reference, parts = _sparse_save(50_000, 4)
    blob, recon = encode_delta(current, reference, bits=2, domain="log")
    assert decode_delta(blob, reference).tobytes() == recon.tobytes()
    _assert_non_negative(recon)
    octaves = np.abs(_patterns(recon) - _patterns(current)) / _OCTAVE
    assert octaves.max() <= LOG_MAX_ERROR_OCTAVES
    verbatim = np.zeros(current.size, bool)
    verbatim[_exceptions(blob, reference)] = True
    # The three populous buckets come back through their symbols; the fourth (10 %) and the
    # jumps (1 %, three buckets) are the exceptions.
    for name in ("decayed", "grew", "grew more"):
        assert verbatim[parts[name]].mean() < 0.01, name
    assert verbatim.mean() < 0.12
    # Priority promotion's choice at the same width: the jumps' buckets, all else verbatim.
    ops = Ops(LOG, "float32")
    stats = ops.stats(current.view(np.int32), reference.view(np.int32), "mean")
    shipped = quantize.make_plan(stats, 2, "mean")
    assert set(np.flatnonzero(shipped.lut)) != set(np.flatnonzero(ops.plan(stats, 2, "mean").lut))


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_where_every_bucket_over_the_bound_fits_promotion_is_unchanged(dtype: str) -> None:
    """At b=3 the seven buckets over the bound all fit: the log domain keeps what priority
    promotion keeps, in the same symbol order, so the blob is the one it always was."""
    current, reference, _ = _sparse_save(20_000, 5)
    cur, ref = current.astype(dtype), reference.astype(dtype)
    view = np.int32 if dtype == "float32" else np.int16
    ops = Ops(LOG, dtype)
    stats = ops.stats(cur.view(view), ref.view(view), "mean")
    for bits in (3, 4, 8):
        assert np.array_equal(ops.plan(stats, bits, "mean").lut,
                              quantize.make_plan(stats, bits, "mean").lut)


def _not_carried(current: np.ndarray, reference: np.ndarray, blob: bytes) -> float:
    """Relative L2 norm, in pattern steps, of the change the decoded output does not carry
    through a symbol: the elements restored as no change or stored verbatim."""
    recon = decode_delta(blob, reference)
    change = (_patterns(current) - _patterns(reference)).astype(np.float64)
    missed = recon == reference
    missed[_exceptions(blob, reference)] = True
    return float(np.linalg.norm(change[missed]) / np.linalg.norm(change))


def test_auto_counts_the_buckets_the_log_domain_drops() -> None:
    """Most elements grew 1.6 octaves (over the bound), a few jumped 64 octaves (most of
    the energy). Counted in priority promotion's order, one symbol would keep the jumps and
    leave 0.1 of the change out, within the budget; but the log domain's one symbol keeps
    the populous bucket, and the jumps go verbatim, 20 % of the elements at ~12 bytes
    each. Counting the buckets it drops, auto takes b=2: all three buckets, no exception."""
    rng = np.random.default_rng(7)
    reference = (rng.uniform(1.0, 2.0, 40_000) * 1e-10).astype(np.float32)
    share = rng.random(reference.size)
    factor = np.where(share < 0.75, 3.0, np.where(share < 0.95, 1.01, 2.0**64))
    current = (reference * factor).astype(np.float32)
    blob, recon = encode_delta(current, reference, bits="auto", domain="log")
    assert decode_delta(blob, reference).tobytes() == recon.tobytes()
    bits = blob_info(blob).bits
    assert _not_carried(current, reference, blob) <= AUTO_MAX_ERROR
    narrower, _ = encode_delta(current, reference, bits=bits - 1, domain="log")
    assert _not_carried(current, reference, narrower) > AUTO_MAX_ERROR
    assert _exceptions(blob, reference).size == 0


def test_outside_the_domain_is_stored_verbatim() -> None:
    """NaN, Inf, negatives and -0.0 are exceptions (as NaN/Inf are in the linear domain);
    an element whose reference was outside the domain comes back exactly too."""
    reference = np.linspace(0.0, 1.0, 16, dtype=np.float32)
    current = reference * np.float32(1.1)
    current[[1, 2, 3, 4, 5]] = [np.nan, np.inf, -np.inf, -2.5, -0.0]
    blob, recon = encode_delta(current, reference, domain="log")
    assert recon[[1, 2, 3, 4, 5]].tobytes() == current[[1, 2, 3, 4, 5]].tobytes()
    assert decode_delta(blob, reference).tobytes() == recon.tobytes()
    after = reference * np.float32(1.2)
    _, again = encode_delta(after, recon, domain="log")
    assert again[[1, 2, 3, 4, 5]].tobytes() == after[[1, 2, 3, 4, 5]].tobytes()
    _assert_non_negative(again)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
def test_every_float_dtype(dtype: str) -> None:
    values = _spanning(3000, 2)
    reference = values * np.float32(0.7)
    if dtype == "bfloat16":
        cur, ref = (values.view(np.uint32) >> 16).astype(np.uint16), (
            reference.view(np.uint32) >> 16).astype(np.uint16)
        blob, recon = encode_delta(cur, ref, domain="log", bfloat16=True)
        widened = (recon.astype(np.uint32) << 16).view(np.float32)
        assert not np.any(recon & 0x8000) and np.all(np.isfinite(widened))
    else:
        cur, ref = values.astype(dtype), reference.astype(dtype)
        blob, recon = encode_delta(cur, ref, domain="log")
        assert np.all(recon >= 0) and not np.any(np.signbit(recon))
    assert decode_delta(blob, ref).tobytes() == recon.tobytes()


_NON_NEGATIVE = st.one_of(
    st.just(0.0), st.floats(float(np.float32(1.4e-45)), float(np.float32(1e-38)), width=32),
    st.floats(float(np.float32(1e-30)), 1e3, width=32),
    st.floats(0.0, float(np.float32(3e38)), width=32),
)


@settings(max_examples=150, deadline=None)
@given(steps=st.lists(hnp.arrays(np.float32, 64, elements=_NON_NEGATIVE), min_size=2,
                      max_size=5),
       bits=st.integers(1, 8))
def test_log_chain_tracks_within_one_step(steps: list[np.ndarray], bits: int) -> None:
    """Each reconstruction is within one step's error of the truth, in bit patterns (a
    log scale): no larger than that step's largest move, however long the chain. So errors
    never accumulate, the decode is the encoder's reconstruction bit for bit, and nothing
    comes back negative."""
    held = steps[0]
    for state in steps[1:]:
        blob, recon = encode_delta(state, held, bits=bits, domain="log")
        assert decode_delta(blob, held).tobytes() == recon.tobytes()
        _assert_non_negative(recon)
        largest_move = np.max(np.abs(_patterns(state) - _patterns(held)))
        error = np.max(np.abs(_patterns(recon) - _patterns(state)))
        assert error <= largest_move * (1 + 2.0**-23) + 1
        assert error <= LOG_MAX_ERROR_OCTAVES * _OCTAVE
        assert np.all(recon[state == 0] == 0)
        held = recon


def test_domain_is_checked() -> None:
    values = np.ones(4, np.float32)
    with pytest.raises(ValueError, match="domain must be one of"):
        encode_delta(values, values, domain="sqrt")  # type: ignore[arg-type]
